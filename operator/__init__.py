"""kaito.operator"""
