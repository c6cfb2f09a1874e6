"""The trio shell: transport, the node process around the pure core, membership, the
controller, microthreads."""
