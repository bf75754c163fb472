"""Evaluations: PhoneBook retrieval over context lengths (``phonebook``), perplexity overall and
by position along long documents (``perplexity``), and their plots (``plots``, matplotlib
imported only when a plot is drawn). ``bamba eval`` runs them from the command line."""
