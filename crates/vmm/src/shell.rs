//! Shell text shared by the backends and the CLI: quoting one word for a POSIX shell, and
//! detaching a command line that ends in `&` from the pipes of whoever runs it.

/// Quote one word for a POSIX shell, only when it needs it: words made of letters, digits and
/// `-_./=:,@%+` stay as they are, anything else (the empty word too) is single-quoted.
pub fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// Wrap a command line so that a trailing `&` detaches it from exec's pipes (else the exec
/// would wait for the background process to close them).
pub fn detach_background(cmd: &str) -> String {
    let t = cmd.trim_end();
    if t.ends_with('&') && !t.ends_with("&&") {
        format!("{{ {t} }} </dev/null >/dev/null 2>&1")
    } else {
        cmd.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_ampersand_detaches() {
        assert_eq!(detach_background("echo hi"), "echo hi");
        assert_eq!(detach_background("a && b"), "a && b");
        assert_eq!(
            detach_background("node x.js &"),
            "{ node x.js & } </dev/null >/dev/null 2>&1"
        );
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("abc-1.2_x/y=z:w,v@u%t+s"), "abc-1.2_x/y=z:w,v@u%t+s");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("we'b"), r"'we'\''b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("~"), "'~'");
    }

    /// A real `sh` reads every quoted word back as the original.
    #[test]
    fn quoted_words_survive_a_real_shell() {
        let words = [
            "plain",
            "",
            "two words",
            "it's",
            "'",
            "''",
            "$(touch /nonexistent/x) `id` $HOME",
            "a\nb",
            "tab\there",
            "*?[]{}<>|&;#!",
            "back\\slash",
            "\"dq\"",
            "ünïcødé",
        ];
        for w in words {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(w)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), w, "word {w:?}");
        }
    }
}
