"""The model search: successive halving and Hyperband brackets, the search space, TPE and GP-UCB, the
search rules' steps, the comparison table, the replay on recorded runs, proxies, model hopping."""
