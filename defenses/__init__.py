"""collafuse.defenses"""
