"""MEND: a trained hypernetwork that maps rank-1 gradient factors to weight updates."""
