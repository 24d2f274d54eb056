"""Privacy at the boundary: scrubbing PHI from what leaves, de-identification, patient rights."""
