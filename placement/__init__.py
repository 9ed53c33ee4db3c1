"""Planning: latency models, workloads, a discrete-event simulator that drives engine/'s
batching policies with a simulated clock, a placement optimizer and goodput/SLO reports.

Imports only the standard library, numpy, matplotlib (reports) and engine/: never torch or ray.

    latency.py, gpus.py, memory.py  roofline latency model, device table, KV capacity
    profile.py                      profiled latency model: fit_profile, save/load_profile
    workload.py                     traces and arrivals: make_workload, load_trace
    simulator.py                    simulate(deployment, workload) -> metrics.SimResult
    instances.py, engine_instance.py, lazy.py, blocks.py
                                    simulated prefill / decode / colocated instances
    deployment.py                   what is simulated, from a plan (deployment_from_plan)
    search.py, optimizer.py, pairing.py
                                    goodput per configuration, DistServe Alg. 1 / Alg. 2, place()
    report*.py, cli.py              `disagg simulate` reports, `disagg place` / `simulate` CLI
"""
