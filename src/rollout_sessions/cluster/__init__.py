"""Many instances behind HAProxy: the supervisor and the balancer's rules."""
