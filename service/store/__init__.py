"""The data directory: durable writes, spool and its index, study manifests, the outbox."""
