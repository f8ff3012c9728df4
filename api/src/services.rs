//! The service catalogue of a compute cluster and dependency resolution
//! (the table in `shared/AMBARI.md`). Pure: no I/O, unit-tested here.
//!
//! Compulsory services are always present; a user names optional ones, and
//! every dependency of a chosen service is added implicitly. The resolved list
//! is in catalogue order (dependencies before what needs them, except the
//! HIVE/HCATALOG pair, which need each other).

/// One service: name, whether users may choose it, what it needs.
pub struct Service {
    pub name: &'static str,
    pub compulsory: bool,
    /// Offered to users (the original platform offered HIVE, OOZIE, PIG, SQOOP).
    pub selectable: bool,
    pub needs: &'static [&'static str],
    pub description: &'static str,
}

pub const CATALOGUE: &[Service] = &[
    Service {
        name: "ZOOKEEPER",
        compulsory: true,
        selectable: false,
        needs: &[],
        description: "coordination service",
    },
    Service {
        name: "HDFS",
        compulsory: true,
        selectable: false,
        needs: &["ZOOKEEPER"],
        description: "distributed file system",
    },
    Service {
        name: "YARN",
        compulsory: true,
        selectable: false,
        needs: &["HDFS"],
        description: "resource manager",
    },
    Service {
        name: "MAPREDUCE2",
        compulsory: true,
        selectable: false,
        needs: &["YARN"],
        description: "MapReduce on YARN",
    },
    Service {
        name: "HIVE",
        compulsory: false,
        selectable: true,
        needs: &["HDFS", "MAPREDUCE2", "HCATALOG", "WEBHCAT"],
        description: "SQL on Hadoop",
    },
    Service {
        name: "HCATALOG",
        compulsory: false,
        selectable: false,
        needs: &["HIVE"],
        description: "table and storage management (comes with HIVE)",
    },
    Service {
        name: "WEBHCAT",
        compulsory: false,
        selectable: false,
        needs: &["HDFS", "MAPREDUCE2"],
        description: "REST API for HCatalog (comes with HIVE)",
    },
    Service {
        name: "OOZIE",
        compulsory: false,
        selectable: true,
        needs: &["HDFS", "MAPREDUCE2"],
        description: "workflow scheduler",
    },
    Service {
        name: "PIG",
        compulsory: false,
        selectable: true,
        needs: &["HDFS", "MAPREDUCE2"],
        description: "data flow language",
    },
    Service {
        name: "SQOOP",
        compulsory: false,
        selectable: true,
        needs: &["HDFS", "MAPREDUCE2"],
        description: "bulk transfer with relational databases",
    },
];

pub fn find(name: &str) -> Option<&'static Service> {
    CATALOGUE.iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// The optional services a user may name.
pub fn selectable() -> impl Iterator<Item = &'static Service> {
    CATALOGUE.iter().filter(|s| s.selectable)
}

/// A requested service that does not exist: its index in the request.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownService {
    pub index: usize,
    pub name: String,
}

impl std::fmt::Display for UnknownService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = selectable().map(|s| s.name).collect();
        write!(
            f,
            "unknown service `{}`; optional services are {}",
            self.name,
            names.join(", ")
        )
    }
}

/// Every service a cluster gets for `requested` (names, any case, repeats
/// allowed): compulsory ones, the requested ones and all their dependencies.
pub fn resolve<S: AsRef<str>>(requested: &[S]) -> Result<Vec<&'static str>, UnknownService> {
    let mut chosen = vec![false; CATALOGUE.len()];
    let mut stack: Vec<&'static Service> = CATALOGUE.iter().filter(|s| s.compulsory).collect();
    for (index, name) in requested.iter().enumerate() {
        let service = find(name.as_ref().trim()).ok_or_else(|| UnknownService {
            index,
            name: name.as_ref().to_owned(),
        })?;
        stack.push(service);
    }
    while let Some(service) = stack.pop() {
        let i = CATALOGUE
            .iter()
            .position(|s| s.name == service.name)
            .expect("in catalogue");
        if std::mem::replace(&mut chosen[i], true) {
            continue;
        }
        stack.extend(
            service
                .needs
                .iter()
                .map(|n| find(n).expect("dependency in catalogue")),
        );
    }
    Ok(CATALOGUE
        .iter()
        .zip(chosen)
        .filter(|(_, c)| *c)
        .map(|(s, _)| s.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 4] = ["ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2"];

    #[test]
    fn nothing_requested_gives_the_compulsory_services() {
        assert_eq!(resolve::<&str>(&[]).unwrap(), BASE);
    }

    #[test]
    fn hive_pulls_in_hcatalog_and_webhcat() {
        let got = resolve(&["hive"]).unwrap();
        assert_eq!(got, [&BASE[..], &["HIVE", "HCATALOG", "WEBHCAT"]].concat());
    }

    #[test]
    fn repeats_and_compulsory_names_are_harmless() {
        assert_eq!(
            resolve(&["PIG", "pig", "HDFS"]).unwrap(),
            [&BASE[..], &["PIG"]].concat()
        );
    }

    #[test]
    fn an_unknown_service_is_named_with_its_position() {
        let err = resolve(&["PIG", "SPARK"]).unwrap_err();
        assert_eq!(
            err,
            UnknownService {
                index: 1,
                name: "SPARK".into()
            }
        );
        assert!(err.to_string().contains("HIVE, OOZIE, PIG, SQOOP"), "{err}");
    }

    #[test]
    fn every_dependency_is_in_the_catalogue() {
        for s in CATALOGUE {
            for n in s.needs {
                assert!(find(n).is_some(), "{} needs unknown {n}", s.name);
            }
        }
    }
}
