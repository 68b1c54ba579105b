//! The network under test: one namespace per node, one for the clients, and a hub namespace
//! holding the bridge they all hang off. Nothing is created in the host's own namespace, so
//! a run cannot disturb the machine it runs on, and deleting the namespaces removes
//! everything (veth pairs die with them).
//!
//! ```text
//!                 hub netns: bridge br0
//!       ┌────────────┬──────┴─────┬────────────┐
//!   veth│        veth│        veth│        veth│
//!  ┌────┴────┐  ┌────┴────┐  ┌────┴────┐  ┌────┴─────┐
//!  │ node 1  │  │ node 2  │  │ node 3  │  │ clients  │
//!  │ .11     │  │ .12     │  │ .13     │  │ .2       │
//!  │ nftables│  │ nftables│  │ nftables│  │ harness  │
//!  └─────────┘  └─────────┘  └─────────┘  └──────────┘
//! ```
//!
//! Faults between nodes are nftables rules in each node's namespace (an `input` chain that
//! drops packets from chosen node addresses); the clients' address is never dropped, so a
//! client can always reach every node, as in Jepsen.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Namespaces are named `egj<pid>-…` so stale ones from a killed harness can be found.
pub const PREFIX: &str = "egj";
const SUBNET: [u8; 3] = [10, 213, 0];

pub struct Net {
    pub id: String,
    pub hub: String,
    pub client: String,
    pub nodes: Vec<String>,
    /// Per node slot: the slots it drops everything from, and the loss percentage. The
    /// partition and loss nemeses overlap, so each sets its half and the rules are the union.
    rules: std::sync::Mutex<Vec<(Vec<usize>, u32)>>,
    torn_down: bool,
}

pub fn node_ip(slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 11 + slot as u8)
}

pub fn client_ip() -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 2)
}

/// How long any one tool (ip, nft, fiu-ctrl) may take. fiu-ctrl, for one, blocks forever
/// on a stopped process's control FIFO.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a command, failing with its stderr, or when it takes longer than [`TOOL_TIMEOUT`].
pub fn sh(args: &[&str]) -> Result<String> {
    run_tool(args, "", TOOL_TIMEOUT)
}

fn sh_input(args: &[&str], input: &str) -> Result<String> {
    run_tool(args, input, TOOL_TIMEOUT)
}

/// Runs blocking work without stalling the async runtime it is called from (the nemesis and
/// the cluster shell out from async code; a blocked worker would stop timers and clients).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn run_tool(args: &[&str], input: &str, timeout: Duration) -> Result<String> {
    blocking(|| run_tool_blocking(args, input, timeout))
}

fn run_tool_blocking(args: &[&str], input: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args[0]))?;
    let mut stdin = child.stdin.take().unwrap();
    if !input.is_empty() {
        stdin.write_all(input.as_bytes())?;
    }
    drop(stdin);
    // Outputs are small (well under a pipe's buffer), so polling cannot deadlock.
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} timed out after {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    if !status.success() {
        bail!("{} failed: {}\n{input}", args.join(" "), err.trim());
    }
    Ok(out)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

impl Net {
    /// Creates the namespaces, the bridge and the links, and an empty nftables table on
    /// every node. On error, whatever was created is removed again.
    pub fn create(nodes: usize) -> Result<Net> {
        let id = format!("{PREFIX}{}", std::process::id());
        let mut net = Net {
            hub: format!("{id}-hub"),
            client: format!("{id}-c"),
            nodes: (0..nodes).map(|i| format!("{id}-n{}", i + 1)).collect(),
            id,
            rules: std::sync::Mutex::new(vec![(Vec::new(), 0); nodes]),
            torn_down: false,
        };
        if let Err(e) = net.build() {
            net.teardown();
            return Err(e);
        }
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        sh(&["ip", "netns", "add", &self.hub])?;
        in_ns(&self.hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&self.hub, &["ip", "link", "set", "br0", "up"])?;
        in_ns(&self.hub, &["ip", "link", "set", "lo", "up"])?;
        let mut hosts: Vec<(String, Ipv4Addr)> =
            self.nodes.iter().enumerate().map(|(i, n)| (n.clone(), node_ip(i))).collect();
        hosts.push((self.client.clone(), client_ip()));
        for (i, (ns, ip)) in hosts.iter().enumerate() {
            sh(&["ip", "netns", "add", ns])?;
            let veth = format!("v{i}");
            in_ns(&self.hub, &["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            in_ns(&self.hub, &["ip", "link", "set", &veth, "master", "br0", "up"])?;
            in_ns(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        for ns in &self.nodes {
            sh_input(
                &["ip", "netns", "exec", ns, "nft", "-f", "-"],
                "table inet jepsen {\n  chain input { type filter hook input priority 0; policy accept; }\n}\n",
            )?;
        }
        Ok(())
    }

    /// Node `slot` drops everything from the `blocked` node slots (a partition; empty heals
    /// it). Packet loss set by [`set_loss`](Self::set_loss) stays.
    pub fn set_blocked(&self, slot: usize, blocked: &[usize]) -> Result<()> {
        let mut rules = self.rules.lock().unwrap();
        rules[slot].0 = blocked.to_vec();
        self.apply_rules(slot, &rules[slot].0, rules[slot].1)
    }

    /// Node `slot` drops `loss_pct` percent of what comes from the other nodes (0 heals it).
    /// A partition set by [`set_blocked`](Self::set_blocked) stays.
    pub fn set_loss(&self, slot: usize, loss_pct: u32) -> Result<()> {
        let mut rules = self.rules.lock().unwrap();
        rules[slot].1 = loss_pct;
        self.apply_rules(slot, &rules[slot].0, rules[slot].1)
    }

    fn apply_rules(&self, slot: usize, blocked: &[usize], loss_pct: u32) -> Result<()> {
        let mut script = String::from("flush chain inet jepsen input\n");
        let others: Vec<String> =
            (0..self.nodes.len()).filter(|s| *s != slot).map(|s| node_ip(s).to_string()).collect();
        if !blocked.is_empty() {
            let ips: Vec<String> = blocked.iter().map(|s| node_ip(*s).to_string()).collect();
            script += &format!("add rule inet jepsen input ip saddr {{ {} }} drop\n", ips.join(", "));
        }
        if loss_pct > 0 && !others.is_empty() {
            script += &format!(
                "add rule inet jepsen input ip saddr {{ {} }} numgen random mod 100 < {loss_pct} drop\n",
                others.join(", ")
            );
        }
        sh_input(&["ip", "netns", "exec", &self.nodes[slot], "nft", "-f", "-"], &script).map(|_| ())
    }

    /// Moves the calling thread into the clients' namespace. Call it on the main thread
    /// before any other thread exists: threads started afterwards inherit it.
    pub fn enter_client_ns(&self) -> Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.client))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns into the client namespace")?;
        Ok(())
    }

    /// Kills whatever still runs in the namespaces and deletes them. Idempotent; never fails.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.guard().teardown();
    }

    /// A guard that tears the namespaces down when dropped (also on panic).
    pub fn guard(&self) -> Guard {
        let mut names = self.nodes.clone();
        names.push(self.client.clone());
        names.push(self.hub.clone());
        Guard { names }
    }
}

pub struct Guard {
    names: Vec<String>,
}

impl Guard {
    pub fn teardown(&mut self) {
        remove_namespaces(&std::mem::take(&mut self.names));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn remove_namespaces(names: &[String]) {
    for ns in names {
        if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // Never kill ourselves: the harness lives in the client namespace.
                if pid as u32 != std::process::id() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let _ = sh(&["ip", "netns", "del", ns]);
    }
}

/// Removes namespaces left by harness runs that no longer exist (a `kill -9`ed harness).
pub fn sweep_stale() -> usize {
    let Ok(list) = sh(&["ip", "netns", "list"]) else { return 0 };
    let mut stale = Vec::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            stale.push(name.to_string());
        }
    }
    remove_namespaces(&stale);
    stale.len()
}

/// Installs the system tools the harness drives, when missing (Debian).
pub fn ensure_tools(need_faketime: bool, need_fiu: bool) -> Result<()> {
    let mut pkgs = Vec::new();
    if sh(&["sh", "-c", "command -v ip"]).is_err() {
        pkgs.push("iproute2");
    }
    if sh(&["sh", "-c", "command -v nft"]).is_err() {
        pkgs.push("nftables");
    }
    if need_faketime && !std::path::Path::new(crate::cluster::LIBFAKETIME).exists() {
        pkgs.push("libfaketime");
    }
    if need_fiu && sh(&["sh", "-c", "command -v fiu-ctrl"]).is_err() {
        pkgs.push("fiu-utils");
    }
    if pkgs.is_empty() {
        return Ok(());
    }
    eprintln!("jepsen: installing {}", pkgs.join(" "));
    let long = Duration::from_secs(900);
    run_tool(&["apt-get", "update", "-qq"], "", long)?;
    let mut cmd = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq"];
    cmd.extend(pkgs);
    run_tool(&cmd, "", long).map(|_| ())
}
