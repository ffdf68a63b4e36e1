"""A replica: one process that loads one served entity's model once and answers predictions."""
