"""fedsynth's benchmarks: `python -m benchmarks` (or `make bench`); figures in RESULTS.md.

    dp_step.py      1. discriminator step: non-DP vs fedsynth's DP step vs stock Opacus
    local_round.py  2. a local round through the ClientApp's train handler vs a plain loop
    deployment.py   3. a federated round on the Deployment Engine vs the same work alone
    aggregation.py  4. server FedAvg time and peak memory for 3, 10, 50 replies
    throughput.py   5. Inception feature and synthetic image throughput
    timing.py       interleaved timing, quartiles, Markdown tables, the machine line

Studies of their own: `python -m benchmarks.federated_noise` (FedAvg of locally noised
updates vs central DP-SGD), `benchmarks/fid_real_vs_real.py`, `benchmarks/fid_federated_eval.py`.
"""
