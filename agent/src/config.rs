//! Command line and environment configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nerve_notice::{Cloud, NoticeKind};

/// Shortest poll interval: the metadata service is local, but polling faster than 10 times a
/// second buys nothing against a two-minute (or 30 s) warning and costs CPU.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest poll interval: GCP gives 30 s of warning; a poll every 10 s at most keeps most of it.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Metadata requests answer in milliseconds; anything slower than this is a fault.
const MIN_METADATA_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// nerve-agent: watches the instance metadata service for interruption notices, streams them to
/// the sidecars on this node and cordons the node.
#[derive(Parser, Debug, Clone)]
#[command(name = "nerve-agent", version, about, max_term_width = 100)]
pub struct Config {
    /// Base URL of the instance metadata service (plain http).
    #[arg(
        long,
        env = "NERVE_METADATA_URL",
        default_value = "http://169.254.169.254",
        value_parser = parse_metadata_url
    )]
    pub metadata_url: String,

    /// Which cloud's metadata service to read: aws, gcp or azure.
    #[arg(long, env = "NERVE_CLOUD", default_value = "aws", value_parser = parse_cloud)]
    pub cloud: Cloud,

    /// Time between metadata polls (100ms to 10s).
    #[arg(long, env = "NERVE_POLL_INTERVAL", default_value = "1s", value_parser = parse_poll_interval)]
    pub poll_interval: Duration,

    /// Timeout of each metadata request (50ms to 30s).
    #[arg(long, env = "NERVE_METADATA_TIMEOUT", default_value = "2s", value_parser = parse_metadata_timeout)]
    pub metadata_timeout: Duration,

    /// Address for the notice stream, metrics and health endpoints.
    #[arg(long, env = "NERVE_LISTEN", default_value = "0.0.0.0:9739")]
    pub listen: SocketAddr,

    /// The Kubernetes node this agent runs on (required in Kubernetes mode unless --passive).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes mode: auto (on in a cluster or when KUBECONFIG is set), on, or off (bare host).
    #[arg(long, env = "NERVE_KUBERNETES", default_value = "auto", value_enum)]
    pub kubernetes: KubernetesMode,

    /// Observe only: detect, log, stream and export metrics; never cordon, taint or drain.
    #[arg(long, env = "NERVE_PASSIVE")]
    pub passive: bool,

    /// Which notice kinds cordon and taint the node (comma-separated; "none" for none).
    #[arg(
        long,
        env = "NERVE_CORDON_ON",
        default_value = "spot-interruption,asg-termination,preemption",
        value_parser = parse_cordon_on
    )]
    pub cordon_on: CordonOn,

    /// Also evict the node's pods on an emergency notice (DaemonSet, mirror and checkpointing
    /// pods are left alone).
    #[arg(long, env = "NERVE_DRAIN")]
    pub drain: bool,

    /// Log format: text or json. The level comes from RUST_LOG (default info).
    #[arg(long, env = "NERVE_LOG_FORMAT", default_value = "text", value_enum)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The notice kinds that cordon the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CordonOn(pub Vec<NoticeKind>);

impl CordonOn {
    pub fn contains(&self, kind: NoticeKind) -> bool {
        self.0.contains(&kind)
    }
}

/// Settings that are valid one by one but not together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Whether the agent talks to Kubernetes, given the process environment.
    pub fn kubernetes_enabled(&self) -> bool {
        match self.kubernetes {
            KubernetesMode::On => true,
            KubernetesMode::Off => false,
            KubernetesMode::Auto => {
                std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
                    || std::env::var_os("KUBECONFIG").is_some()
            }
        }
    }

    /// Whether the agent writes to the node (cordon, taint, events, evictions).
    pub fn acts_on_node(&self) -> bool {
        self.kubernetes_enabled() && !self.passive
    }

    /// Checks the settings together; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.acts_on_node() && self.node_name.as_deref().is_none_or(str::is_empty) {
            problems.push(
                "--node-name (NODE_NAME) is required in Kubernetes mode; set it from the \
                 downward API (spec.nodeName), or use --passive or --kubernetes off"
                    .to_owned(),
            );
        }
        if self.drain && self.cordon_on.0.is_empty() && !self.passive {
            problems.push(
                "--drain needs --cordon-on to name at least one kind (a drain follows a cordon)"
                    .to_owned(),
            );
        }
        if self.metadata_timeout > self.poll_interval * 10 {
            problems.push(format!(
                "--metadata-timeout {} is more than ten poll intervals ({}); use at most {}",
                humantime::format_duration(self.metadata_timeout),
                humantime::format_duration(self.poll_interval),
                humantime::format_duration(self.poll_interval * 10),
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn parse_metadata_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "expected a URL such as http://169.254.169.254".to_owned())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(
            "expected a plain http://HOST[:PORT] URL (metadata services speak plain HTTP)"
                .to_owned(),
        );
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn parse_cloud(s: &str) -> Result<Cloud, String> {
    s.parse()
        .map_err(|err: nerve_notice::ParseCloudError| err.to_string())
}

fn parse_duration_in(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|err| format!("{err}; expected a duration such as 1s or 500ms"))?;
    if d < min || d > max {
        return Err(format!(
            "expected between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_poll_interval(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, MIN_POLL_INTERVAL, MAX_POLL_INTERVAL)
}

fn parse_metadata_timeout(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, MIN_METADATA_TIMEOUT, MAX_METADATA_TIMEOUT)
}

fn parse_cordon_on(s: &str) -> Result<CordonOn, String> {
    if s.trim().is_empty() || s.trim() == "none" {
        return Ok(CordonOn(Vec::new()));
    }
    let mut kinds = Vec::new();
    for part in s.split(',') {
        let kind: NoticeKind = part
            .parse()
            .map_err(|err: nerve_notice::ParseNoticeKindError| format!("{err} (or \"none\")"))?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(CordonOn(kinds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("nerve-agent").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_design() {
        let config = parse(&["--kubernetes", "off"]).unwrap();
        assert_eq!(config.metadata_url, "http://169.254.169.254");
        assert_eq!(config.cloud, Cloud::Aws);
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        assert_eq!(config.listen, "0.0.0.0:9739".parse().unwrap());
        assert!(!config.passive);
        assert!(!config.drain);
        assert_eq!(
            config.cordon_on.0,
            vec![
                NoticeKind::SpotInterruption,
                NoticeKind::AsgTermination,
                NoticeKind::Preemption
            ]
        );
        config.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_kinds_naming_the_valid_ones() {
        let err = parse(&["--cordon-on", "spot-interruption,reboot"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cordon-on"), "{err}");
        assert!(err.contains("rebalance-recommendation"), "{err}");
        let config = parse(&["--cordon-on", "none", "--kubernetes", "off"]).unwrap();
        assert!(config.cordon_on.0.is_empty());
    }

    #[test]
    fn rejects_poll_intervals_out_of_range() {
        let err = parse(&["--poll-interval", "10ms"]).unwrap_err().to_string();
        assert!(
            err.contains("--poll-interval") && err.contains("100ms"),
            "{err}"
        );
        let err = parse(&["--poll-interval", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--poll-interval"), "{err}");
    }

    #[test]
    fn rejects_unknown_clouds_and_https_metadata_urls() {
        let err = parse(&["--cloud", "ibm"]).unwrap_err().to_string();
        assert!(err.contains("aws, gcp, azure"), "{err}");
        let err = parse(&["--metadata-url", "https://169.254.169.254"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--metadata-url") && err.contains("plain http"),
            "{err}"
        );
    }

    #[test]
    fn requires_a_node_name_to_act_on_the_node() {
        let config = parse(&["--kubernetes", "on"]).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("--node-name"), "{err}");
        let config = parse(&["--kubernetes", "on", "--passive"]).unwrap();
        config.validate().unwrap();
        let config = parse(&["--kubernetes", "on", "--node-name", "n1"]).unwrap();
        config.validate().unwrap();
    }
}
