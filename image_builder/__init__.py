"""kaito.image_builder"""
