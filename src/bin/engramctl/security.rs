//! `engramctl`'s security commands: certificates (files only), keys, roles, grants, quotas,
//! and how the CLI connects to a secured cluster.

use std::path::PathBuf;

use clap::Subcommand;
use engram::auth::certs::CertAuthority;
use engram::auth::token::ApiKey;
use engram::client::{Client, ClientOptions, ClientTls};
use engram::proto as pb;

use super::Cli;

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Make the cluster CA: DIR/ca.pem and DIR/ca-key.pem (0600). Refuses to overwrite.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name in every certificate: [a-z0-9-], e.g. `prod-eu`.
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make node ID's certificate with the CA in DIR: DIR/node-ID.pem and DIR/node-ID-key.pem.
    Node {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// An address or DNS name clients dial this node by (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a client certificate (for `api_client_ca_file`): DIR/client-NAME.pem and key.
    Client {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
pub enum AuthCmd {
    /// API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Roles and their grants.
    #[command(subcommand)]
    Role(RoleCmd),
    /// Who the credential in use is, and what it may do.
    Whoami,
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make a key for principal NAME; the key is printed (or written to --out) once.
    Create {
        #[arg(long)]
        name: String,
        /// A role name (repeat); `root` is built in.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Expire after this many seconds (default: never).
        #[arg(long, default_value_t = 0)]
        ttl_secs: u64,
        /// Write the key to this file (0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum RoleCmd {
    Create {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Add a grant: PERMS (read,write,delete,admin) on the namespaces PATTERN matches.
    Grant {
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long = "perm", value_delimiter = ',', required = true)]
        perms: Vec<String>,
        /// Only memories tagged KEY=VALUE; VALUE `$principal` is the caller's own name.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Remove every grant on exactly PATTERN.
    Revoke {
        name: String,
        #[arg(long)]
        namespace: String,
    },
    List,
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// Set a tenant's limits; limits left out are unlimited.
    Set {
        tenant: String,
        #[arg(long)]
        max_namespaces: Option<u64>,
        #[arg(long)]
        max_memories: Option<u64>,
        #[arg(long)]
        max_bytes: Option<u64>,
    },
    List,
}

/// The client the global flags describe.
pub fn connect(cli: &Cli) -> Result<Client, Box<dyn std::error::Error>> {
    if cli.insecure {
        return Ok(Client::new(cli.endpoints.clone())?);
    }
    let ca = cli
        .ca_file
        .as_deref()
        .ok_or("a secured cluster needs --ca-file (ENGRAM_CA_FILE); --insecure talks to a development node")?;
    let pair = cli.client_cert.as_deref().zip(cli.client_key.as_deref());
    let tls = ClientTls::from_files(ca, cli.server_name.clone(), pair)?;
    let credential = match (&cli.api_key_file, std::env::var("ENGRAM_API_KEY")) {
        (Some(path), _) => {
            let bytes = engram::secrets::read_private(path)?;
            Some(String::from_utf8(bytes.to_vec()).map_err(|_| "the key file is not text")?.trim().to_string())
        }
        (None, Ok(k)) => Some(k.trim().to_string()),
        (None, Err(_)) => None,
    };
    Ok(Client::with_options(cli.endpoints.clone(), ClientOptions { tls: Some(tls), credential, ..Default::default() })?)
}

/// The root key for `cluster init`: the one in `path` (a retry), else a new one written there.
pub fn root_key(path: &std::path::Path) -> Result<ApiKey, Box<dyn std::error::Error>> {
    if path.exists() {
        let text = engram::secrets::read_private(path)?;
        return Ok(ApiKey::parse(std::str::from_utf8(&text)?.trim())?);
    }
    let key = ApiKey::generate();
    engram::secrets::write_private(path, format!("{}\n", &*key.expose()).as_bytes(), false)?;
    Ok(key)
}

pub fn certs_cmd(cmd: CertsCmd) -> Result<(), Box<dyn std::error::Error>> {
    let write_pair =
        |dir: &std::path::Path, stem: &str, cert: &str, key: &str| -> Result<(), Box<dyn std::error::Error>> {
            let (c, k) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
            if c.exists() {
                return Err(format!("{} exists; not overwriting", c.display()).into());
            }
            engram::secrets::write_private(&k, key.as_bytes(), false)?;
            std::fs::write(&c, cert)?;
            println!("wrote {} and {} (0600)", c.display(), k.display());
            Ok(())
        };
    let load = |dir: &std::path::Path| -> Result<CertAuthority, Box<dyn std::error::Error>> {
        let cert = std::fs::read_to_string(dir.join("ca.pem"))?;
        let key = engram::secrets::read_private(&dir.join("ca-key.pem"))?;
        Ok(CertAuthority::load(&cert, std::str::from_utf8(&key)?)?)
    };
    match cmd {
        CertsCmd::Init { dir, cluster, days } => {
            std::fs::create_dir_all(&dir)?;
            let ca = CertAuthority::generate(&cluster, days)?;
            write_pair(&dir, "ca", &ca.cert_pem, &ca.key_pem())?;
            println!(
                "cluster {cluster}: clients verify nodes as {}",
                engram::auth::identity::cluster_dns_name(&cluster)
            );
        }
        CertsCmd::Node { dir, id, hosts, days } => {
            let node = load(&dir)?.issue_node(id, &hosts, days)?;
            write_pair(&dir, &format!("node-{id}"), &node.cert_pem, &node.key_pem)?;
        }
        CertsCmd::Client { dir, name, days } => {
            let c = load(&dir)?.issue_client(&name, days)?;
            write_pair(&dir, &format!("client-{name}"), &c.cert_pem, &c.key_pem)?;
        }
    }
    Ok(())
}

fn print_role(r: &pb::Role) {
    println!("{}", r.name);
    for g in &r.grants {
        let tag = if g.tag_key.is_empty() { String::new() } else { format!("  tag {}={}", g.tag_key, g.tag_value) };
        println!("    {}  {}{tag}", g.namespace, g.permissions.join(","));
    }
}

pub async fn auth_cmd(client: &Client, cmd: AuthCmd) -> Result<(), Box<dyn std::error::Error>> {
    let auth = client.auth();
    match cmd {
        AuthCmd::Whoami => {
            let w = auth.whoami().await?;
            println!(
                "{} ({}{}) cluster_admin={}",
                w.principal,
                w.kind,
                if w.key_id.is_empty() { String::new() } else { format!(" {}", w.key_id) },
                w.cluster_admin
            );
            w.roles.iter().for_each(print_role);
        }
        AuthCmd::Key(KeyCmd::Create { name, roles, ttl_secs, out }) => {
            let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
            let r = auth.create_key(&name, &roles, ttl_secs).await?;
            let id = r.info.map(|i| i.id).unwrap_or_default();
            match out {
                Some(path) => {
                    engram::secrets::write_private(&path, format!("{}\n", r.key).as_bytes(), false)?;
                    println!("key {id} for {name} written to {} (0600)", path.display());
                }
                None => {
                    eprintln!("key {id} for {name} (shown once):");
                    println!("{}", r.key);
                }
            }
        }
        AuthCmd::Key(KeyCmd::List) => {
            for k in auth.list_keys().await? {
                let state = if k.revoked_at_ms > 0 { "revoked" } else { "active" };
                println!(
                    "{}  {}  roles=[{}]  {state}  expires_at_ms={}",
                    k.id,
                    k.name,
                    k.roles.join(","),
                    k.expires_at_ms
                );
            }
        }
        AuthCmd::Key(KeyCmd::Revoke { id }) => {
            let r = auth.revoke_key(&id).await?;
            println!("{}", if r.existed { "revoked" } else { "no such key" });
        }
        AuthCmd::Role(RoleCmd::Create { name }) => print_role(&auth.create_role(&name).await?.role.unwrap_or_default()),
        AuthCmd::Role(RoleCmd::Delete { name }) => {
            println!("{}", if auth.delete_role(&name).await?.existed { "deleted" } else { "no such role" })
        }
        AuthCmd::Role(RoleCmd::Grant { name, namespace, perms, tag }) => {
            let tag = tag.as_deref().map(|t| t.split_once('=').ok_or("tag must be KEY=VALUE")).transpose()?;
            let perms: Vec<&str> = perms.iter().map(String::as_str).collect();
            print_role(&auth.grant(&name, &namespace, &perms, tag).await?.role.unwrap_or_default());
        }
        AuthCmd::Role(RoleCmd::Revoke { name, namespace }) => {
            print_role(&auth.revoke_grant(&name, &namespace).await?.role.unwrap_or_default())
        }
        AuthCmd::Role(RoleCmd::List) => auth.list_roles().await?.iter().for_each(print_role),
    }
    Ok(())
}

pub async fn quota_cmd(client: &Client, cmd: QuotaCmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        QuotaCmd::Set { tenant, max_namespaces, max_memories, max_bytes } => {
            let q = pb::Quota {
                max_namespaces,
                max_memories_per_namespace: max_memories,
                max_bytes_per_namespace: max_bytes,
            };
            let r = client.auth().set_quota(&tenant, q).await?;
            println!("quota of {tenant} set (log index {})", r.applied_index);
        }
        QuotaCmd::List => {
            let show = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            for (tenant, q) in client.auth().list_quotas().await?.quotas {
                println!(
                    "{tenant}  namespaces={}  memories/namespace={}  bytes/namespace={}",
                    show(q.max_namespaces),
                    show(q.max_memories_per_namespace),
                    show(q.max_bytes_per_namespace)
                );
            }
        }
    }
    Ok(())
}
