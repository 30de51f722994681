"""The worker plane: what a Faust worker runs around the agents — processors, batches, retries, sweeper, heartbeat, ops endpoints, topics; and the supervisor of a host's workers."""
