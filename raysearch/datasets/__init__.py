"""Data sets written from sample photographs: copy-detection sets (`copyset`) and miniature
replicas of the DISC21 and GLDv2 layouts (`replicas`) for trying and testing the jobs."""
