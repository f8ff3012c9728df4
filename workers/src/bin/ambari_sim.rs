//! `orrery-ambari-sim` (being written).
fn main() {}
