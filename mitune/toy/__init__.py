"""Toy models with closed-form denoisers, used as ground truth for the MI estimators."""
