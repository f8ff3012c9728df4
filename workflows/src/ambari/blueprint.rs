//! From "a cluster of N hosts with these optional services" to the two
//! documents Ambari wants: the blueprint (which components each host group
//! runs) and the cluster-creation template (which hosts are in each group).
//!
//! Pure functions over the service table of `AMBARI.md`; no I/O. The
//! emulator uses the same table to validate blueprints and to know which
//! components are clients.
//!
//! Layout rule: host groups are `master` (cardinality `1`: the first host,
//! which runs every master component) and `workers` (cardinality `1+`, every
//! other host). A cluster smaller than [`SMALL_CLUSTER_THRESHOLD`] hosts has
//! too few machines to spare one for masters only, so the master host also
//! runs the worker components; with a single host the `workers` group is
//! omitted (a `1+` group cannot be empty).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Below this many hosts, the master host also runs the worker components.
pub const SMALL_CLUSTER_THRESHOLD: usize = 3;

pub const MASTER_GROUP: &str = "master";
pub const WORKERS_GROUP: &str = "workers";

/// Where a component runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Exactly one instance, on the master host.
    Master,
    /// On every worker host.
    Worker,
    /// A client library/CLI on every host.
    Client,
}

/// One row of the service table.
#[derive(Debug)]
pub struct ServiceDef {
    pub name: &'static str,
    pub components: &'static [(&'static str, Placement)],
    pub needs: &'static [&'static str],
    pub compulsory: bool,
}

use Placement::{Client as C, Master as M, Worker as S};

/// The services of a compute cluster (`AMBARI.md`), in installation order.
pub const SERVICES: &[ServiceDef] = &[
    ServiceDef {
        name: "ZOOKEEPER",
        components: &[("ZOOKEEPER_SERVER", S), ("ZOOKEEPER_CLIENT", C)],
        needs: &[],
        compulsory: true,
    },
    ServiceDef {
        name: "HDFS",
        components: &[
            ("NAMENODE", M),
            ("SECONDARY_NAMENODE", M),
            ("DATANODE", S),
            ("HDFS_CLIENT", C),
        ],
        needs: &["ZOOKEEPER"],
        compulsory: true,
    },
    ServiceDef {
        name: "YARN",
        components: &[
            ("RESOURCEMANAGER", M),
            ("NODEMANAGER", S),
            ("YARN_CLIENT", C),
        ],
        needs: &["HDFS"],
        compulsory: true,
    },
    ServiceDef {
        name: "MAPREDUCE2",
        components: &[("HISTORYSERVER", M), ("MAPREDUCE2_CLIENT", C)],
        needs: &["YARN"],
        compulsory: true,
    },
    ServiceDef {
        name: "HIVE",
        components: &[
            ("HIVE_SERVER", M),
            ("HIVE_METASTORE", M),
            ("MYSQL_SERVER", M),
            ("HIVE_CLIENT", C),
        ],
        needs: &["HDFS", "MAPREDUCE2", "HCATALOG", "WEBHCAT"],
        compulsory: false,
    },
    ServiceDef {
        name: "HCATALOG",
        components: &[("HCAT", C)],
        needs: &["HIVE"],
        compulsory: false,
    },
    ServiceDef {
        name: "WEBHCAT",
        components: &[("WEBHCAT_SERVER", M)],
        needs: &["HDFS", "MAPREDUCE2"],
        compulsory: false,
    },
    ServiceDef {
        name: "OOZIE",
        components: &[("OOZIE_SERVER", M), ("OOZIE_CLIENT", C)],
        needs: &["HDFS", "MAPREDUCE2"],
        compulsory: false,
    },
    ServiceDef {
        name: "PIG",
        components: &[("PIG", C)],
        needs: &["HDFS", "MAPREDUCE2"],
        compulsory: false,
    },
    ServiceDef {
        name: "SQOOP",
        components: &[("SQOOP", C)],
        needs: &["HDFS", "MAPREDUCE2"],
        compulsory: false,
    },
];

pub fn service(name: &str) -> Option<&'static ServiceDef> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The service a component belongs to and where it runs.
pub fn component(name: &str) -> Option<(&'static ServiceDef, Placement)> {
    SERVICES.iter().find_map(|s| {
        s.components
            .iter()
            .find(|(c, _)| *c == name)
            .map(|(_, p)| (s, *p))
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlueprintError {
    #[error(
        "unknown service `{0}` (known: ZOOKEEPER, HDFS, YARN, MAPREDUCE2, HIVE, HCATALOG, \
         WEBHCAT, OOZIE, PIG, SQOOP)"
    )]
    UnknownService(String),
    #[error("a cluster needs at least one host")]
    NoHosts,
    #[error("host `{0}` is listed twice")]
    DuplicateHost(String),
    #[error("host name `{0}` is empty or has spaces")]
    BadHost(String),
}

/// The compulsory services plus the requested ones plus everything they
/// need, transitively, in the table's order. Names are matched without
/// regard to case; an unknown name is an error naming it.
pub fn resolve_services<S: AsRef<str>>(
    requested: &[S],
) -> Result<Vec<&'static str>, BlueprintError> {
    let mut chosen: BTreeSet<&'static str> = BTreeSet::new();
    let mut todo: Vec<&'static ServiceDef> = SERVICES.iter().filter(|s| s.compulsory).collect();
    for name in requested {
        let wanted = name.as_ref().trim().to_ascii_uppercase();
        let def = service(&wanted)
            .ok_or_else(|| BlueprintError::UnknownService(name.as_ref().trim().to_owned()))?;
        todo.push(def);
    }
    while let Some(def) = todo.pop() {
        if chosen.insert(def.name) {
            todo.extend(def.needs.iter().filter_map(|n| service(n)));
        }
    }
    Ok(SERVICES
        .iter()
        .map(|s| s.name)
        .filter(|n| chosen.contains(n))
        .collect())
}

/// `POST /blueprints/{name}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blueprint {
    #[serde(rename = "Blueprints")]
    pub info: BlueprintInfo,
    #[serde(default)]
    pub configurations: Vec<Value>,
    pub host_groups: Vec<HostGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueprintInfo {
    pub stack_name: String,
    pub stack_version: String,
    /// Set by the server in `GET` answers; not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blueprint_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGroup {
    pub name: String,
    pub cardinality: String,
    pub components: Vec<ComponentRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRef {
    pub name: String,
}

impl Blueprint {
    /// `(group, component)` pairs: what two blueprints must agree on to be
    /// interchangeable.
    pub fn layout(&self) -> BTreeSet<(String, String)> {
        self.host_groups
            .iter()
            .flat_map(|g| {
                g.components
                    .iter()
                    .map(move |c| (g.name.clone(), c.name.clone()))
            })
            .collect()
    }
}

/// `POST /clusters/{name}` body (blueprint-based creation).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTemplate {
    pub blueprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_password: Option<String>,
    pub host_groups: Vec<HostGroupHosts>,
}

impl fmt::Debug for ClusterTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTemplate")
            .field("blueprint", &self.blueprint)
            .field(
                "default_password",
                &self.default_password.as_ref().map(|_| "<redacted>"),
            )
            .field("host_groups", &self.host_groups)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGroupHosts {
    pub name: String,
    pub hosts: Vec<Fqdn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fqdn {
    pub fqdn: String,
}

impl ClusterTemplate {
    /// Every host with its group.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.host_groups.iter().flat_map(|g| {
            g.hosts
                .iter()
                .map(move |h| (g.name.as_str(), h.fqdn.as_str()))
        })
    }
}

/// What to build.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub blueprint_name: String,
    pub stack_name: String,
    pub stack_version: String,
    /// Optional services the user chose (the compulsory ones are implied).
    pub services: Vec<String>,
    /// Fully qualified host names as the agents registered them; the first
    /// one runs the master components.
    pub hosts: Vec<String>,
    /// Ambari's `default_password` for services that need one (Hive's DB).
    pub default_password: Option<String>,
}

impl fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("blueprint_name", &self.blueprint_name)
            .field(
                "stack",
                &format!("{}-{}", self.stack_name, self.stack_version),
            )
            .field("services", &self.services)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// The resolved services and both documents.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPlan {
    pub services: Vec<&'static str>,
    pub blueprint: Blueprint,
    pub template: ClusterTemplate,
    /// Whether the master host also runs the worker components.
    pub colocated: bool,
}

/// Resolve the services and lay them out on the hosts (see the module docs
/// for the rule).
pub fn plan(spec: &ClusterSpec) -> Result<ClusterPlan, BlueprintError> {
    let services = resolve_services(&spec.services)?;
    let (master, workers) = spec.hosts.split_first().ok_or(BlueprintError::NoHosts)?;
    let mut seen = BTreeSet::new();
    for h in &spec.hosts {
        if h.trim().is_empty() || h.contains(char::is_whitespace) {
            return Err(BlueprintError::BadHost(h.clone()));
        }
        if !seen.insert(h.as_str()) {
            return Err(BlueprintError::DuplicateHost(h.clone()));
        }
    }
    let colocated = spec.hosts.len() < SMALL_CLUSTER_THRESHOLD;
    let pick = |wanted: &[Placement]| -> Vec<ComponentRef> {
        services
            .iter()
            .filter_map(|s| service(s))
            .flat_map(|s| s.components.iter())
            .filter(|(_, p)| wanted.contains(p))
            .map(|(c, _)| ComponentRef {
                name: (*c).to_owned(),
            })
            .collect()
    };
    let master_components = if colocated {
        pick(&[Placement::Master, Placement::Worker, Placement::Client])
    } else {
        pick(&[Placement::Master, Placement::Client])
    };
    let mut host_groups = vec![HostGroup {
        name: MASTER_GROUP.into(),
        cardinality: "1".into(),
        components: master_components,
    }];
    let mut template_groups = vec![HostGroupHosts {
        name: MASTER_GROUP.into(),
        hosts: vec![Fqdn {
            fqdn: master.clone(),
        }],
    }];
    if !workers.is_empty() {
        host_groups.push(HostGroup {
            name: WORKERS_GROUP.into(),
            cardinality: "1+".into(),
            components: pick(&[Placement::Worker, Placement::Client]),
        });
        template_groups.push(HostGroupHosts {
            name: WORKERS_GROUP.into(),
            hosts: workers.iter().map(|h| Fqdn { fqdn: h.clone() }).collect(),
        });
    }
    Ok(ClusterPlan {
        services,
        blueprint: Blueprint {
            info: BlueprintInfo {
                stack_name: spec.stack_name.clone(),
                stack_version: spec.stack_version.clone(),
                blueprint_name: None,
            },
            configurations: Vec::new(),
            host_groups,
        },
        template: ClusterTemplate {
            blueprint: spec.blueprint_name.clone(),
            default_password: spec.default_password.clone(),
            host_groups: template_groups,
        },
        colocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(services: &[&str], hosts: &[&str]) -> ClusterSpec {
        ClusterSpec {
            blueprint_name: "bp".into(),
            stack_name: "HDP".into(),
            stack_version: "2.6".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            default_password: Some("secret".into()),
        }
    }

    fn group<'a>(bp: &'a Blueprint, name: &str) -> Option<Vec<&'a str>> {
        bp.host_groups
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.components.iter().map(|c| c.name.as_str()).collect())
    }

    #[test]
    fn compulsory_services_are_always_present() {
        let none: [&str; 0] = [];
        assert_eq!(
            resolve_services(&none).unwrap(),
            ["ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2"]
        );
    }

    #[test]
    fn hive_pulls_hcatalog_and_webhcat() {
        assert_eq!(
            resolve_services(&["hive"]).unwrap(),
            [
                "ZOOKEEPER",
                "HDFS",
                "YARN",
                "MAPREDUCE2",
                "HIVE",
                "HCATALOG",
                "WEBHCAT"
            ]
        );
    }

    #[test]
    fn a_dependency_chosen_implicitly_is_added_implicitly() {
        // HCATALOG needs HIVE, which in turn needs WEBHCAT.
        let got = resolve_services(&["HCATALOG"]).unwrap();
        assert!(got.contains(&"HIVE") && got.contains(&"WEBHCAT"), "{got:?}");
    }

    #[test]
    fn duplicates_and_case_do_not_matter() {
        assert_eq!(
            resolve_services(&["Pig", "PIG", " sqoop "]).unwrap(),
            ["ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2", "PIG", "SQOOP"]
        );
    }

    #[test]
    fn an_unknown_service_is_an_error_naming_it() {
        let err = resolve_services(&["PIG", "SPARK"]).unwrap_err();
        assert_eq!(err, BlueprintError::UnknownService("SPARK".into()));
        assert!(err.to_string().contains("`SPARK`"));
    }

    #[test]
    fn a_large_cluster_keeps_masters_apart_from_workers() {
        let plan = plan(&spec(&["OOZIE"], &["h1", "h2", "h3"])).unwrap();
        assert!(!plan.colocated);
        let master = group(&plan.blueprint, "master").unwrap();
        let workers = group(&plan.blueprint, "workers").unwrap();
        assert!(master.contains(&"NAMENODE") && master.contains(&"OOZIE_SERVER"));
        assert!(master.contains(&"HDFS_CLIENT") && master.contains(&"OOZIE_CLIENT"));
        assert!(!master.contains(&"DATANODE"));
        assert!(workers.contains(&"DATANODE") && workers.contains(&"NODEMANAGER"));
        assert!(workers.contains(&"ZOOKEEPER_SERVER") && workers.contains(&"YARN_CLIENT"));
        assert!(!workers.contains(&"NAMENODE"));
        let cards: Vec<_> = plan
            .blueprint
            .host_groups
            .iter()
            .map(|g| g.cardinality.as_str())
            .collect();
        assert_eq!(cards, ["1", "1+"]);
        let hosts: Vec<_> = plan.template.hosts().collect();
        assert_eq!(
            hosts,
            [("master", "h1"), ("workers", "h2"), ("workers", "h3")]
        );
    }

    #[test]
    fn a_small_cluster_puts_worker_roles_on_the_master_host() {
        let two = plan(&spec(&[], &["h1", "h2"])).unwrap();
        assert!(two.colocated);
        let master = group(&two.blueprint, "master").unwrap();
        assert!(master.contains(&"NAMENODE") && master.contains(&"DATANODE"));
        assert!(group(&two.blueprint, "workers").is_some());

        let one = plan(&spec(&[], &["h1"])).unwrap();
        assert!(one.colocated);
        assert!(group(&one.blueprint, "workers").is_none());
        assert_eq!(one.template.host_groups.len(), 1);
    }

    #[test]
    fn bad_host_lists_are_refused() {
        assert_eq!(plan(&spec(&[], &[])).unwrap_err(), BlueprintError::NoHosts);
        assert_eq!(
            plan(&spec(&[], &["h1", "h1"])).unwrap_err(),
            BlueprintError::DuplicateHost("h1".into())
        );
    }

    #[test]
    fn the_documents_serialize_as_ambari_expects() {
        let plan = plan(&spec(&[], &["h1", "h2", "h3"])).unwrap();
        let bp = serde_json::to_value(&plan.blueprint).unwrap();
        assert_eq!(bp["Blueprints"]["stack_name"], "HDP");
        assert_eq!(bp["host_groups"][1]["cardinality"], "1+");
        assert_eq!(
            bp["host_groups"][0]["components"][0]["name"],
            "ZOOKEEPER_CLIENT"
        );
        let cl = serde_json::to_value(&plan.template).unwrap();
        assert_eq!(cl["blueprint"], "bp");
        assert_eq!(cl["host_groups"][1]["hosts"][1]["fqdn"], "h3");
        assert!(!format!("{:?}", plan.template).contains("secret"));
    }

    #[test]
    fn every_component_maps_back_to_its_service() {
        assert_eq!(component("HCAT").unwrap().0.name, "HCATALOG");
        assert_eq!(component("DATANODE").unwrap().1, Placement::Worker);
        assert!(component("NOPE").is_none());
    }
}
