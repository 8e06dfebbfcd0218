//! The rules as data: the text of sistemo's two tables (the `ip` table's NAT and filter chains,
//! the `bridge` table's port filter) and of their elements, for rebuilds and the nft fallback.

use super::*;
use std::fmt::Write as _;

impl Nftables {
    pub(super) fn elements(&self, out: &mut String, verb: &str, mappings: &[PortMapping]) {
        let (bound, any): (Vec<&PortMapping>, Vec<&PortMapping>) =
            mappings.iter().partition(|m| m.bind.is_some());
        let t = &self.table;
        let with_value = verb == "add";
        for (map, list) in [(MAP_ANY, any), (MAP_BOUND, bound)] {
            for chunk in list.chunks(4096) {
                let _ = write!(out, "{verb} element {FAMILY} {t} {map} {{ ");
                for (i, m) in chunk.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    if let Some(b) = m.bind {
                        let _ = write!(out, "{b} . ");
                    }
                    let _ = write!(out, "{} . {}", m.proto, m.host_port);
                    if with_value {
                        let _ = write!(out, " : {} . {}", m.ip, m.machine_port);
                    }
                }
                out.push_str(" }\n");
            }
        }
    }

    pub(super) fn bridge_list(bridges: &[BridgeNet]) -> String {
        bridges
            .iter()
            .map(|b| format!("\"{}\"", b.bridge))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The whole table definition (without elements of the maps).
    pub(super) fn table_text(&self, desired: &Desired) -> String {
        let t = &self.table;
        let mut s = String::new();
        let _ = writeln!(s, "table {FAMILY} {t} {{");
        let _ = writeln!(s, "\tset {SET_BRIDGES} {{\n\t\ttype ifname");
        if !desired.bridges.is_empty() {
            let _ = writeln!(s, "\t\telements = {{ {} }}", Self::bridge_list(&desired.bridges));
        }
        s.push_str("\t}\n");
        let _ = writeln!(
            s,
            "\tset {SET_SUBNETS} {{\n\t\ttype ipv4_addr\n\t\tflags interval"
        );
        if !desired.bridges.is_empty() {
            let subnets: Vec<String> = desired.bridges.iter().map(|b| b.subnet.to_string()).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", subnets.join(", "));
        }
        s.push_str("\t}\n");
        let _ = writeln!(s, "\tset {SET_HOST_PORTS} {{\n\t\ttype inet_service");
        if !self.policy.host_ports.is_empty() {
            let ports: Vec<String> = self.policy.host_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", ports.join(", "));
        }
        s.push_str("\t}\n");
        let _ = writeln!(
            s,
            "\tmap {MAP_ANY} {{\n\t\ttype inet_proto . inet_service : ipv4_addr . inet_service\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tmap {MAP_BOUND} {{\n\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n\t}}"
        );
        let dnat = format!(
            "\t\tfib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @{MAP_BOUND}\n\
             \t\tfib daddr type local dnat ip to meta l4proto . th dport map @{MAP_ANY}\n"
        );
        let _ = writeln!(
            s,
            "\tchain guard {{\n\t\ttype filter hook prerouting priority {PRIO_RAW}; policy accept;\n\
             \t\tiifname @{SET_BRIDGES} ip daddr 127.0.0.0/8 drop\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority {PRIO_DSTNAT}; policy accept;\n{dnat}\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain output {{\n\t\ttype nat hook output priority {PRIO_DSTNAT}; policy accept;\n{dnat}\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority {PRIO_SRCNAT}; policy accept;\n\
             \t\toifname @{SET_BRIDGES} ip saddr 127.0.0.0/8 masquerade\n\
             \t\tip saddr @{SET_SUBNETS} oifname @{SET_BRIDGES} ct status dnat masquerade\n\
             \t\tip saddr @{SET_SUBNETS} oifname != @{SET_BRIDGES} masquerade\n\t}}"
        );
        // Into machines only what was exposed (DNAT) and replies: no direct routing from the
        // LAN, no new connections between networks. Out of machines: no spoofed sources, no
        // link-local (cloud metadata) and, by default, no SMTP.
        let _ = writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority {PRIO_FILTER}; policy accept;\n\
             \t\toifname @{SET_BRIDGES} ct status dnat accept\n\
             \t\toifname @{SET_BRIDGES} ct state established,related accept"
        );
        // Machines of one network talk directly (bridged); with br_netfilter loaded (Docker
        // hosts) that traffic passes this hook too, in and out of the same bridge.
        for b in &desired.bridges {
            let _ = writeln!(s, "\t\tiifname \"{0}\" oifname \"{0}\" accept", b.bridge);
        }
        let _ = writeln!(
            s,
            "\t\toifname @{SET_BRIDGES} drop\n\t\tiifname @{SET_BRIDGES} ip saddr != @{SET_SUBNETS} drop"
        );
        if !self.policy.allow_metadata {
            let _ = writeln!(s, "\t\tiifname @{SET_BRIDGES} ip daddr 169.254.0.0/16 drop");
        }
        if self.policy.block_smtp {
            let _ = writeln!(
                s,
                "\t\tiifname @{SET_BRIDGES} ct state new tcp dport {{ 25, 465, 587 }} drop"
            );
        }
        s.push_str("\t}\n");
        // Machines reach the host only for replies, ping, and the ports the config lists.
        let _ = writeln!(
            s,
            "\tchain input {{\n\t\ttype filter hook input priority {PRIO_FILTER}; policy accept;\n\
             \t\tiifname != @{SET_BRIDGES} accept\n\
             \t\tct state established,related accept\n\
             \t\ticmp type echo-request accept\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport @{SET_HOST_PORTS} accept\n\
             \t\tdrop\n\t}}\n}}"
        );
        s
    }

    /// The bridge-family table: each machine port may send only from its own MAC and IP
    /// (Ethernet, ARP and IPv4), so no machine can take another's address or answer for the
    /// gateway; nothing but IPv4 and ARP leaves a machine (sistemo offers no IPv6: no path to
    /// the host's `::` listeners, no router advertisement, no DHCPv6, no VLAN-tagged frame
    /// around these checks), and DHCP-server replies are dropped.
    /// Ports that are not machines' (another daemon's, the bridge's own) pass untouched.
    pub(super) fn bridge_table_text(&self) -> String {
        let t = &self.table;
        format!(
            "table bridge {t} {{\n\
             \tset {SET_PORTS} {{\n\t\ttype ifname\n\t}}\n\
             \tset {SET_PORT_MAC} {{\n\t\ttype ifname . ether_addr\n\t}}\n\
             \tset {SET_PORT_IP} {{\n\t\ttype ifname . ipv4_addr\n\t}}\n\
             \tchain {BRIDGE_CHAIN} {{\n\t\ttype filter hook prerouting priority {PRIO_BRIDGE}; policy accept;\n\
             \t\tiifname != @{SET_PORTS} accept\n\
             \t\tiifname . ether saddr != @{SET_PORT_MAC} drop\n\
             \t\tether type arp iifname . arp saddr ether != @{SET_PORT_MAC} drop\n\
             \t\tether type arp iifname . arp saddr ip != @{SET_PORT_IP} drop\n\
             \t\tether type ip iifname . ip saddr != @{SET_PORT_IP} drop\n\
             \t\tether type != {{ ip, arp }} drop\n\
             \t\tether type ip udp sport 67 drop\n\t}}\n}}\n"
        )
    }

    /// `verb` (`add` or `delete`) the bindings of `ports`. A port is filtered only while it has
    /// its bindings: they go in before it joins the ports set, and out after it left.
    pub(super) fn port_elements(&self, out: &mut String, verb: &str, ports: &[MachinePort]) {
        let t = &self.table;
        for chunk in ports.chunks(1024) {
            let join =
                |f: &dyn Fn(&MachinePort) -> String| chunk.iter().map(f).collect::<Vec<_>>().join(", ");
            let names = format!(
                "{verb} element bridge {t} {SET_PORTS} {{ {} }}\n",
                join(&|p| format!("\"{}\"", p.ifname))
            );
            let bindings = format!(
                "{verb} element bridge {t} {SET_PORT_MAC} {{ {} }}\n{verb} element bridge {t} {SET_PORT_IP} {{ {} }}\n",
                join(&|p| format!("\"{}\" . {}", p.ifname, format_mac(&p.mac))),
                join(&|p| format!("\"{}\" . {}", p.ifname, p.ip)),
            );
            if verb == "add" {
                out.push_str(&bindings);
                out.push_str(&names);
            } else {
                out.push_str(&names);
                out.push_str(&bindings);
            }
        }
    }

    /// The atomic rebuild script of both tables: ensure, delete, define, fill.
    pub fn rebuild_script(&self, desired: &Desired) -> String {
        let t = &self.table;
        let mut s = format!(
            "table {FAMILY} {t}\ndelete table {FAMILY} {t}\ntable bridge {t}\ndelete table bridge {t}\n"
        );
        s.push_str(&self.table_text(desired));
        s.push_str(&self.bridge_table_text());
        self.elements(&mut s, "add", &desired.mappings);
        self.port_elements(&mut s, "add", &desired.ports);
        s
    }
}
