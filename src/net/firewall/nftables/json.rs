//! Reading what the kernel holds: `nft -j` answers parsed object by object with the `nftables`
//! crate's typed schema, skipping what the schema cannot read (foreign tables' objects).

use ::nftables::schema::{Chain, NfListObject, Rule};
use ::nftables::stmt::Statement;
use ::nftables::types::{NfChainPolicy, NfFamily, NfHook};
use serde::Deserialize as _;

/// A base chain of another table, as nft commands name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ForeignChain {
    pub(super) family: &'static str,
    pub(super) table: String,
    pub(super) name: String,
}

impl std::fmt::Display for ForeignChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.name)
    }
}

/// The family as nft's command line spells it.
pub(super) fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// The objects of an `nft -j list …` answer. Each is parsed on its own: one the schema cannot
/// read (in a foreign table) is skipped, so it neither fails the answer nor hides the others.
/// An answer that is not an nftables document at all yields nothing.
pub(super) fn listing(json: &str) -> Vec<NfListObject<'static>> {
    #[derive(serde::Deserialize)]
    struct Document {
        nftables: Vec<serde_json::Value>,
    }
    let Ok(doc) = serde_json::from_str::<Document>(json) else {
        tracing::debug!("nft -j answer is not an nftables document");
        return vec![];
    };
    doc.nftables
        .into_iter()
        .filter_map(|v| match NfListObject::deserialize(v) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!(error = %e, "skipping an nft object the schema cannot read");
                None
            }
        })
        .collect()
}

/// The chains of an answer.
pub(super) fn chains(json: &str) -> impl Iterator<Item = Chain<'static>> {
    listing(json).into_iter().filter_map(|o| match o {
        NfListObject::Chain(c) => Some(c),
        _ => None,
    })
}

/// The rules of an answer.
pub(super) fn rules(json: &str) -> impl Iterator<Item = Rule<'static>> {
    listing(json).into_iter().filter_map(|o| match o {
        NfListObject::Rule(r) => Some(r),
        _ => None,
    })
}

/// From `nft -j list chains`: forward base chains with policy drop outside table `ip <ours>`.
pub(super) fn foreign_drop_forward(json: &str, ours: &str) -> Vec<ForeignChain> {
    chains(json)
        .filter(|c| c.hook == Some(NfHook::Forward) && c.policy == Some(NfChainPolicy::Drop))
        .filter(|c| !(c.family == NfFamily::IP && c.table == ours))
        .map(|c| ForeignChain {
            family: family_name(c.family),
            table: c.table.into_owned(),
            name: c.name.into_owned(),
        })
        .collect()
}

/// From `nft -j -a list chain …`: handles and comments of the rules tagged `tag` (alone or
/// followed by a space and the bridges).
pub(super) fn tagged(json: &str, tag: &str) -> Vec<(u32, String)> {
    rules(json)
        .filter_map(|r| {
            let c = r.comment?;
            let ours = c
                .strip_prefix(tag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '));
            ours.then(|| (r.handle.unwrap_or(0), c.into_owned()))
        })
        .collect()
}

/// From `nft -j list chains ip`: the names of table `ip <table>`'s chains.
pub(super) fn chain_names(json: &str, table: &str) -> Vec<String> {
    chains(json)
        .filter(|c| c.family == NfFamily::IP && c.table == table)
        .map(|c| c.name.into_owned())
        .collect()
}

/// From `nft -j list chain ip <table> <chain>`: how many of its rules DNAT.
pub(super) fn dnat_rules(json: &str, table: &str, chain: &str) -> usize {
    rules(json)
        .filter(|r| r.family == NfFamily::IP && r.table == table && r.chain == chain)
        .filter(|r| r.expr.iter().any(|s| matches!(s, Statement::DNAT(_))))
        .count()
}

/// From `nft -j list table <family> <table>`: how many rules each chain of table `<table>`
/// (of any family) holds, keyed `family chain` (chains without rules included, with 0).
pub(super) fn rule_counts(json: &str, table: &str) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for o in listing(json) {
        match o {
            NfListObject::Chain(c) if c.table == table => {
                counts
                    .entry(format!("{} {}", family_name(c.family), c.name))
                    .or_insert(0);
            }
            NfListObject::Rule(r) if r.table == table => {
                *counts
                    .entry(format!("{} {}", family_name(r.family), r.chain))
                    .or_insert(0) += 1;
            }
            _ => {}
        }
    }
    counts
}
