"""collafuse.benchmarks"""
