package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/aquasecurity/trivy-db/pkg/db"
	"github.com/aquasecurity/trivy-db/pkg/metadata"
	"github.com/aquasecurity/trivy-db/pkg/types"
	"github.com/aquasecurity/trivy-db/pkg/vulnsrc/vulnerability"
	bolt "go.etcd.io/bbolt"
)

// Summary counts what WriteCache stored.
type Summary struct {
	Advisories int
	Entries    int
	Buckets    int
}

// WriteCache builds outDir/db (trivy.db and metadata.json) from advisories.
//
// The database is written to a temporary folder beside the old one and then
// swapped in by rename, so a Trivy process never opens a half-written file.
func WriteCache(advisories []Advisory, outDir string, now time.Time) (Summary, error) {
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Summary{}, fmt.Errorf("creating output folder %q failed: %w", outDir, err)
	}
	buildDir, err := os.MkdirTemp(outDir, ".db-build-")
	if err != nil {
		return Summary{}, fmt.Errorf("creating a build folder in %q failed: %w", outDir, err)
	}
	defer os.RemoveAll(buildDir)

	summary, err := writeDatabase(advisories, buildDir)
	if err != nil {
		return Summary{}, err
	}

	// Trivy rejects --skip-db-update unless Version equals its schema
	// version. Without that flag it downloads a new DB once NextUpdate has
	// passed, so a NextUpdate far ahead keeps the fixture DB current.
	meta := metadata.Metadata{
		Version:      db.SchemaVersion,
		NextUpdate:   now.AddDate(100, 0, 0),
		UpdatedAt:    now,
		DownloadedAt: now,
	}
	if err := metadata.NewClient(buildDir).Update(meta); err != nil {
		return Summary{}, fmt.Errorf("writing metadata.json failed: %w", err)
	}
	// os.MkdirTemp creates the folder with mode 0700, but other users of the
	// cache need to read it.
	if err := os.Chmod(buildDir, 0o755); err != nil {
		return Summary{}, fmt.Errorf("making %q readable failed: %w", buildDir, err)
	}

	if err := swapIn(buildDir, filepath.Join(outDir, "db")); err != nil {
		return Summary{}, err
	}
	return summary, nil
}

func writeDatabase(advisories []Advisory, dir string) (Summary, error) {
	if err := db.Init(dir); err != nil {
		return Summary{}, fmt.Errorf("creating %s failed: %w", db.Path(dir), err)
	}
	dbc := db.Config{}

	summary := Summary{Advisories: len(advisories)}
	buckets := map[string]bool{}
	err := dbc.Connection().Update(func(tx *bolt.Tx) error {
		for _, advisory := range advisories {
			if err := dbc.PutVulnerability(tx, advisory.ID, advisory.vulnerability()); err != nil {
				return fmt.Errorf("%s: storing advisory %s failed: %w", advisory.File, advisory.ID, err)
			}

			for index, affected := range advisory.Affected {
				bucketName, source, err := affected.bucketName()
				if err != nil {
					return fmt.Errorf("%s: advisory %s: affected[%d]: %w", advisory.File, advisory.ID, index, err)
				}
				if !buckets[bucketName] {
					if err := dbc.PutDataSource(tx, bucketName, source); err != nil {
						return fmt.Errorf("storing the data source of bucket %q failed: %w", bucketName, err)
					}
					buckets[bucketName] = true
				}

				path := []string{bucketName, affected.packageKey()}
				if existing := bucketValue(tx, path, advisory.ID); existing != nil {
					return fmt.Errorf("%s: advisory %s: affected[%d] repeats package %q in %q; list each package once per release",
						advisory.File, advisory.ID, index, affected.Package, bucketName)
				}
				entry := affected.advisory()
				// A pointer, because types.Advisory encodes its Status only
				// through its pointer-receiver MarshalJSON.
				if err := dbc.PutAdvisory(tx, path, advisory.ID, &entry); err != nil {
					return fmt.Errorf("%s: storing advisory %s for %q failed: %w", advisory.File, advisory.ID, affected.Package, err)
				}
				summary.Entries++
			}
		}
		return nil
	})
	closeErr := db.Close()
	if err != nil {
		return Summary{}, err
	}
	if closeErr != nil {
		return Summary{}, fmt.Errorf("closing %s failed: %w", db.Path(dir), closeErr)
	}
	summary.Buckets = len(buckets)
	return summary, nil
}

func bucketValue(tx *bolt.Tx, path []string, key string) []byte {
	current := tx.Bucket([]byte(path[0]))
	for _, name := range path[1:] {
		if current == nil {
			return nil
		}
		current = current.Bucket([]byte(name))
	}
	if current == nil {
		return nil
	}
	return current.Get([]byte(key))
}

// swapIn replaces target with the finished folder built.
func swapIn(built, target string) error {
	old := target + ".old"
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("removing stale folder %q failed: %w", old, err)
	}
	if err := os.Rename(target, old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("moving the previous database %q aside failed: %w", target, err)
	}
	if err := os.Rename(built, target); err != nil {
		return fmt.Errorf("moving the new database into %q failed: %w", target, err)
	}
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("removing the previous database %q failed: %w", old, err)
	}
	return nil
}

// vulnerability returns the record of the "vulnerability" bucket, which
// Trivy reads to fill in a finding's title, description, severity, CVSS,
// references and dates.
func (a Advisory) vulnerability() types.Vulnerability {
	vendorSeverity := types.VendorSeverity{}
	if a.Severity != "" {
		// Validate has checked every severity name.
		severity, _ := parseSeverity(a.Severity)
		vendorSeverity[vulnerability.NVD] = severity
	}
	for source, name := range a.VendorSeverity {
		severity, _ := parseSeverity(name)
		vendorSeverity[types.SourceID(source)] = severity
	}

	var vendorCVSS types.VendorCVSS
	for source, cvss := range a.CVSS {
		if vendorCVSS == nil {
			vendorCVSS = types.VendorCVSS{}
		}
		vendorCVSS[types.SourceID(source)] = types.CVSS{
			V2Vector: cvss.V2Vector, V2Score: cvss.V2Score,
			V3Vector: cvss.V3Vector, V3Score: cvss.V3Score,
			V40Vector: cvss.V40Vector, V40Score: cvss.V40Score,
		}
	}

	result := types.Vulnerability{
		Title:            a.Title,
		Description:      a.Description,
		Severity:         a.Severity,
		CweIDs:           a.CWEIDs,
		CVSS:             vendorCVSS,
		References:       a.References,
		PublishedDate:    utc(a.Published),
		LastModifiedDate: utc(a.LastModified),
	}
	if len(vendorSeverity) > 0 {
		result.VendorSeverity = vendorSeverity
	}
	return result
}

// advisory returns the per-package record that Trivy's detectors compare
// installed versions against.
func (a Affected) advisory() types.Advisory {
	entry := types.Advisory{
		VendorIDs:          a.VendorIDs,
		FixedVersion:       a.FixedVersion,
		VulnerableVersions: a.VulnerableVersions,
		PatchedVersions:    a.PatchedVersions,
	}
	if a.Status != "" {
		entry.Status = types.NewStatus(a.Status)
	}
	if a.Severity != "" {
		entry.Severity, _ = parseSeverity(a.Severity)
	}
	return entry
}

func utc(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	value := t.UTC()
	return &value
}
