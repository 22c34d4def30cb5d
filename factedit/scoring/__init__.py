"""Scoring a model: teacher-forced sequence scores, what the model says, the evaluation's measures."""
