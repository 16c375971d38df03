"""kaito.tuning"""
