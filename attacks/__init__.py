"""collafuse.attacks"""
