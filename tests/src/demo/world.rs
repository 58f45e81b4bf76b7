//! The world around the pods: one simulated machine per rank (a metadata simulator playing a
//! Spot instance, and the real agent as the chart's DaemonSet runs it), the API-server stand-in
//! serving their Nodes, and the store.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use super::children::free_port;
use super::observe;
use super::{DemoOptions, JOB, Names, READY_TIMEOUT};
use crate::apiserver::ApiServer;
use crate::imds::MetadataSimulator;
use crate::s3::S3Server;

/// One simulated machine: its metadata service and where its agent serves.
pub struct Machine {
    pub node: String,
    pub imds: MetadataSimulator,
    pub agent_url: String,
}

pub struct World {
    pub machines: Vec<Machine>,
    pub api: ApiServer,
    kubeconfig: PathBuf,
    _embedded_s3: Option<S3Server>,
    /// What every Nerve process is told of the store: endpoint (and the embedded server's
    /// credentials), `NERVE_DEST`, `NERVE_JOB`, path-style addressing.
    pub store_env: Vec<(&'static str, String)>,
}

impl World {
    pub fn start(options: &DemoOptions, names: Names) -> anyhow::Result<World> {
        let mut machines = Vec::with_capacity(names.ranks);
        for rank in 0..names.ranks {
            machines.push(Machine {
                node: names.node(rank),
                imds: MetadataSimulator::start(),
                agent_url: format!("http://127.0.0.1:{}", free_port()?),
            });
        }
        let node_names: Vec<&str> = machines.iter().map(|m| m.node.as_str()).collect();
        let api = ApiServer::start_with_nodes(&node_names);
        let kubeconfig = api.write_kubeconfig(&options.work);
        let (embedded_s3, mut store_env) = match &options.s3_endpoint {
            Some(endpoint) => (None, vec![("AWS_ENDPOINT_URL", endpoint.clone())]),
            None => {
                let server = start_embedded_store(options)?;
                let env = server.client_env();
                (Some(server), env)
            }
        };
        store_env.push(("NERVE_DEST", format!("s3://{}/checkpoints", options.bucket)));
        store_env.push(("NERVE_JOB", JOB.to_owned()));
        store_env.push(("NERVE_PATH_STYLE", "true".to_owned()));
        Ok(World {
            machines,
            api,
            kubeconfig,
            _embedded_s3: embedded_s3,
            store_env,
        })
    }

    /// The first line of the demo: where the stand-ins listen.
    pub fn describe(&self) -> String {
        let metadata = match self.machines.as_slice() {
            [machine] => format!("metadata service {}", machine.imds.url()),
            machines => {
                let urls: Vec<String> = machines
                    .iter()
                    .map(|m| format!("{} ({})", m.imds.url(), m.node))
                    .collect();
                format!("metadata services {}", urls.join(", "))
            }
        };
        let nodes = match self.machines.len() {
            1 => String::new(),
            count => format!(" ({count} Nodes)"),
        };
        let store = self
            .store_env
            .iter()
            .find(|(k, _)| *k == "AWS_ENDPOINT_URL")
            .map(|(_, v)| v.as_str())
            .unwrap_or("from the AWS SDK chain");
        format!(
            "{metadata} · API server {}{nodes} · S3 {store}",
            self.api.url()
        )
    }

    /// The agent of machine `rank` as the chart's DaemonSet runs it: env vars only.
    pub fn agent_env(&self, rank: usize) -> anyhow::Result<Vec<(&'static str, String)>> {
        let machine = &self.machines[rank];
        let listen = machine
            .agent_url
            .strip_prefix("http://")
            .context("the agent URL is not http://")?;
        Ok(vec![
            ("NERVE_METADATA_URL", machine.imds.url()),
            ("NERVE_LISTEN", listen.to_owned()),
            ("NERVE_KUBERNETES", "on".to_owned()),
            ("NODE_NAME", machine.node.clone()),
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
        ])
    }
}

fn start_embedded_store(options: &DemoOptions) -> anyhow::Result<S3Server> {
    let root = options.work.join("s3");
    std::fs::create_dir_all(&root).context("creating the embedded store's directory")?;
    let server = S3Server::start_at(&root, SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("starting the embedded S3 server")?;
    server
        .create_bucket(&options.bucket)
        .context("creating the demo bucket")?;
    Ok(server)
}

impl super::Demo<'_> {
    /// Starts every machine's agent and waits until each has answered its first metadata poll.
    pub(super) async fn start_agents(&mut self) -> anyhow::Result<()> {
        for rank in 0..self.names.ranks {
            let env = self.world.agent_env(rank)?;
            let log = self.names.log("nerve-agent", rank);
            self.children.spawn("nerve-agent", &log, &[], &env)?;
        }
        for (rank, machine) in self.world.machines.iter().enumerate() {
            let log = self.names.log("nerve-agent", rank);
            observe::wait_ready(&format!("{}/readyz", machine.agent_url), READY_TIMEOUT)
                .await
                .with_context(|| {
                    format!("waiting for nerve-agent to be ready (see logs/{log}.log)")
                })?;
            self.out
                .line(format!("nerve-agent ready{}", self.names.on(rank)));
        }
        Ok(())
    }
}
