//! tiersync node.
