"""Everything that runs inside one rank."""
