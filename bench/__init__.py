"""metabench harness: run configs, suites, records, leaderboard."""
