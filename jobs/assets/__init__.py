"""A team's models and datasets: uploads and their validation (`uploads`), where files
live under STORAGE_ROOT (`storage`), registering them (`services`), serving job
artifacts (`artifacts`), and their pages."""
