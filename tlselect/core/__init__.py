"""What every part shares, without torch: errors, checked file writes, backbone stage tables, run
settings (hyperparameter keys, inits, freeze depths), the run registry, and recovery after kills."""
