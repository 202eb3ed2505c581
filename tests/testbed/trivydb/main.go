// Command trivydb builds a Trivy cache folder from advisory YAML files.
//
// Usage:
//
//	trivydb ADVISORY_DIR OUT_DIR
//
// It writes OUT_DIR/db/trivy.db (the bbolt vulnerability database in the
// layout Trivy's scanners read) and OUT_DIR/db/metadata.json, so that
// `trivy --cache-dir OUT_DIR --skip-db-update ...` scans against exactly the
// advisories given. The YAML format is described in tests/testbed/README.md.
package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: trivydb ADVISORY_DIR OUT_DIR")
		os.Exit(2)
	}
	advisoryDir, outDir := os.Args[1], os.Args[2]

	advisories, err := LoadAdvisories(advisoryDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "trivydb:", err)
		os.Exit(1)
	}

	summary, err := WriteCache(advisories, outDir, time.Now().UTC().Truncate(time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, "trivydb:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %d advisories (%d package entries in %d buckets) to %s/db\n",
		summary.Advisories, summary.Entries, summary.Buckets, outDir)
}
