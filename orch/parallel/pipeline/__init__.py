"""Pipeline parallelism: stages split by layers, one executor for every orch schedule, and the
measured timeline of each logged step."""
