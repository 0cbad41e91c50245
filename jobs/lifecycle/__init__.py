"""A job from submit to its end: `services` (submit, cancel, wake the scheduler),
`states` (the only code that changes a job's status, each change with a JobEvent),
`scheduler` (dispatch pending jobs onto hosts; reap jobs whose worker died), and the
job pages (`views`, `forms`, `selectors`, `charts`)."""
