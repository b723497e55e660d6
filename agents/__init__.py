"""Learning agents for vimo-env: CTDE discrete SAC, baselines, three-stage trainer, evaluation."""
