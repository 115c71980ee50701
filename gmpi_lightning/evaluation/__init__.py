"""Evaluation: FID/KID (Inception, cached real statistics), 3D metrics, estimator-based pose/depth errors."""
