"""`qf calendar`: the Shabbat and Yom Tov pauses of shared/shabbat.py, listed for people and scripts."""
