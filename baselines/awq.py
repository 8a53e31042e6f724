"""AWQ (Lin et al., 2024): activation-aware scaling and clipping, then the min-max grid."""
