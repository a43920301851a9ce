"""The driver side of a step-logged job: the recovery policy (pure), the shell that observes
Ray and carries out its decisions, and the job directory."""
