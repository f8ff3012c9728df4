//! Ambari: the REST client on the real API v1, and the emulator used for
//! development and tests. (Being written.)
