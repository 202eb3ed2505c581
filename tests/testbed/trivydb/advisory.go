package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/aquasecurity/trivy-db/pkg/types"
	"gopkg.in/yaml.v3"
)

// Advisory is one vulnerability as written in an advisory YAML file: its
// details plus every package and release it affects.
type Advisory struct {
	ID             string            `yaml:"id"`
	Title          string            `yaml:"title"`
	Description    string            `yaml:"description"`
	Severity       string            `yaml:"severity"`
	VendorSeverity map[string]string `yaml:"vendor_severity"`
	CVSS           map[string]CVSS   `yaml:"cvss"`
	CWEIDs         []string          `yaml:"cwe_ids"`
	References     []string          `yaml:"references"`
	Published      *time.Time        `yaml:"published"`
	LastModified   *time.Time        `yaml:"last_modified"`
	Affected       []Affected        `yaml:"affected"`

	// File is the advisory's source file, for error messages.
	File string `yaml:"-"`
}

// CVSS contains the vectors and base scores that one source assigned.
type CVSS struct {
	V2Vector  string  `yaml:"v2_vector"`
	V2Score   float64 `yaml:"v2_score"`
	V3Vector  string  `yaml:"v3_vector"`
	V3Score   float64 `yaml:"v3_score"`
	V40Vector string  `yaml:"v40_vector"`
	V40Score  float64 `yaml:"v40_score"`
}

// Affected names one package in one ecosystem (and, for an OS, one release)
// and the versions of it that the advisory covers.
type Affected struct {
	Ecosystem string `yaml:"ecosystem"`
	Release   string `yaml:"release"`
	Package   string `yaml:"package"`

	// OS ecosystems: the first fixed version, or a status when no fix exists.
	FixedVersion string `yaml:"fixed_version"`
	Status       string `yaml:"status"`
	Severity     string `yaml:"severity"`

	// Language ecosystems: version constraints in the ecosystem's syntax.
	VulnerableVersions []string `yaml:"vulnerable_versions"`
	PatchedVersions    []string `yaml:"patched_versions"`

	VendorIDs []string `yaml:"vendor_ids"`
}

var (
	// idPattern accepts the identifier forms Trivy reports: CVE-2023-0286,
	// GHSA-j8r2-6x86-q33q, TEMP-0841856-B18BAF, and similar vendor ids.
	idPattern = regexp.MustCompile(`^[A-Z][A-Z0-9]*(-[A-Za-z0-9]+)+$`)

	// unfixedStatuses are the statuses Trivy understands for an OS advisory
	// without a fixed version (trivy-db pkg/types/status.go).
	unfixedStatuses = []string{"affected", "will_not_fix", "fix_deferred", "end_of_life", "under_investigation"}
)

// LoadAdvisories reads every *.yaml and *.yml file below dir, in path order.
// A file may contain several advisories as YAML documents separated by "---".
func LoadAdvisories(dir string) ([]Advisory, error) {
	info, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("advisory folder %q cannot be read: %w", dir, err)
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("advisory folder %q is not a folder; pass the folder that contains the YAML files", dir)
	}

	var paths []string
	err = filepath.WalkDir(dir, func(path string, entry fs.DirEntry, walkErr error) error {
		if walkErr != nil {
			return walkErr
		}
		if !entry.IsDir() && (strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			paths = append(paths, path)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walking advisory folder %q failed: %w", dir, err)
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("advisory folder %q contains no .yaml or .yml files", dir)
	}
	slices.Sort(paths)

	var advisories []Advisory
	seen := map[string]string{}
	for _, path := range paths {
		loaded, err := loadFile(path)
		if err != nil {
			return nil, err
		}
		for _, advisory := range loaded {
			if first, ok := seen[advisory.ID]; ok {
				return nil, fmt.Errorf("%s: advisory %s is also defined in %s; keep one definition per id",
					path, advisory.ID, first)
			}
			seen[advisory.ID] = path
			advisories = append(advisories, advisory)
		}
	}
	return advisories, nil
}

func loadFile(path string) ([]Advisory, error) {
	content, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading advisory file %q failed: %w", path, err)
	}

	// KnownFields makes a misspelt key an error instead of a silently
	// ignored field that would leave the database without the fact.
	decoder := yaml.NewDecoder(bytes.NewReader(content))
	decoder.KnownFields(true)

	var advisories []Advisory
	for index := 1; ; index++ {
		var advisory Advisory
		err := decoder.Decode(&advisory)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d is not a valid advisory: %w", path, index, err)
		}
		advisory.File = path
		if err := advisory.Validate(); err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", path, index, err)
		}
		advisories = append(advisories, advisory)
	}
	return advisories, nil
}

// Validate checks the advisory against the rules of the format documented in
// tests/testbed/README.md, so a bad fixture fails at build time, not as a
// missing finding in a scan.
func (a Advisory) Validate() error {
	if !idPattern.MatchString(a.ID) {
		return fmt.Errorf("id %q is invalid; use an identifier such as CVE-2023-0286 or GHSA-j8r2-6x86-q33q", a.ID)
	}
	if _, err := parseSeverity(a.Severity); err != nil {
		return fmt.Errorf("advisory %s: severity: %w", a.ID, err)
	}
	for source, severity := range a.VendorSeverity {
		if _, err := parseSeverity(severity); err != nil {
			return fmt.Errorf("advisory %s: vendor_severity %q: %w", a.ID, source, err)
		}
	}
	if len(a.Affected) == 0 {
		return fmt.Errorf("advisory %s has no affected packages; add at least one entry under affected", a.ID)
	}
	for index, affected := range a.Affected {
		if err := affected.validate(); err != nil {
			return fmt.Errorf("advisory %s: affected[%d]: %w", a.ID, index, err)
		}
	}
	return nil
}

func (a Affected) validate() error {
	if a.Package == "" {
		return errors.New("package is missing")
	}
	eco, ok := ecosystems[a.Ecosystem]
	if !ok {
		return fmt.Errorf("ecosystem %q is not supported; use one of %s", a.Ecosystem, strings.Join(ecosystemNames(), ", "))
	}

	if eco.os {
		if a.Release == "" {
			return fmt.Errorf("%s package %q needs a release, such as %q", a.Ecosystem, a.Package, eco.exampleRelease)
		}
		if len(a.VulnerableVersions) > 0 || len(a.PatchedVersions) > 0 {
			return fmt.Errorf("%s package %q is an OS package; give fixed_version, not vulnerable_versions or patched_versions", a.Ecosystem, a.Package)
		}
		if a.FixedVersion == "" && a.Status == "" {
			return fmt.Errorf("%s package %q needs fixed_version, or a status (%s) when no fix exists",
				a.Ecosystem, a.Package, strings.Join(unfixedStatuses, ", "))
		}
		if a.FixedVersion != "" && a.Status != "" {
			return fmt.Errorf("%s package %q has both fixed_version and status %q; a fixed advisory takes no status", a.Ecosystem, a.Package, a.Status)
		}
		if a.Status != "" && !slices.Contains(unfixedStatuses, a.Status) {
			return fmt.Errorf("status %q is invalid; use one of %s", a.Status, strings.Join(unfixedStatuses, ", "))
		}
		if _, err := parseSeverity(a.Severity); err != nil {
			return fmt.Errorf("severity: %w", err)
		}
		return nil
	}

	if a.Release != "" || a.FixedVersion != "" || a.Status != "" || a.Severity != "" {
		return fmt.Errorf("%s package %q is a language package; release, fixed_version, status and severity apply to OS packages only", a.Ecosystem, a.Package)
	}
	if len(a.VulnerableVersions) == 0 && len(a.PatchedVersions) == 0 {
		return fmt.Errorf("%s package %q needs vulnerable_versions, patched_versions or both", a.Ecosystem, a.Package)
	}
	for _, constraint := range append(slices.Clone(a.VulnerableVersions), a.PatchedVersions...) {
		// An empty constraint makes Trivy report every version as vulnerable
		// (trivy pkg/detector/library/compare/compare.go).
		if strings.TrimSpace(constraint) == "" {
			return fmt.Errorf("%s package %q has an empty version constraint; remove it or write the range", a.Ecosystem, a.Package)
		}
	}
	return nil
}

// parseSeverity accepts Trivy's severity names; an empty value is UNKNOWN.
func parseSeverity(name string) (types.Severity, error) {
	if name == "" {
		return types.SeverityUnknown, nil
	}
	severity, err := types.NewSeverity(name)
	if err != nil {
		return types.SeverityUnknown, fmt.Errorf("%q is invalid; use one of %s", name, strings.Join(types.SeverityNames, ", "))
	}
	return severity, nil
}
