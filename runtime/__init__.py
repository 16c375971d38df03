"""kaito.runtime"""
