"""Arithmetic on the tables (middle layer): R = w·φ + (1−w)·ρ, the Pareto front and resampling
(:mod:`.ranking_math`), and the paired tests with Holm's correction (:mod:`.significance`)."""
