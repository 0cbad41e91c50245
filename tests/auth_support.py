"""Authorization headers that the API and the endpoints gateway both refuse (one rule,
jobs.teams.tokens.bearer_token), each with what the refusal must say is wrong."""

MALFORMED_AUTHORIZATION = [
    ("Bearer  {token}", "more than one space"),
    ("Bearer\t{token}", "more than one space (or a tab)"),
    ("Bearer", "no token after Bearer"),
    ("{token}", "does not start with 'Bearer '"),
    ("Basic dXNlcjpwYXNz", "scheme is 'Basic'"),
    ("Bearer {token} x", "a space in or after the token"),
]
