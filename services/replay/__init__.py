"""`cascade replay`: closed-loop marketplace replay of the real cascade against the truth."""
