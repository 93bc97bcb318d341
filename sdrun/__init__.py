"""sdrun: reproduce 'Deep Networks with Stochastic Depth' (Huang et al., ECCV 2016)."""

__version__ = "0.1.0"
