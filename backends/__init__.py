"""Device models (sans-I/O) and the process that hosts one."""
