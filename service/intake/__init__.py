"""From instances to studies: respiratory phase rules, 4D assembly, the producer side of the job queue."""
