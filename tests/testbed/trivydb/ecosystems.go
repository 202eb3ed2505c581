package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/aquasecurity/trivy-db/pkg/ecosystem"
	"github.com/aquasecurity/trivy-db/pkg/types"
	"github.com/aquasecurity/trivy-db/pkg/vulnsrc/bucket"
	"github.com/aquasecurity/trivy-db/pkg/vulnsrc/vulnerability"
)

// ecosystemSpec describes where Trivy looks up advisories of one ecosystem and
// which data source it reports for them. The names and data sources are the
// ones the public trivy-db writes, so the fixture DB reads like the real one.
type ecosystemSpec struct {
	os             bool
	exampleRelease string
	dataSource     types.DataSource

	// osBucket names the root bucket of one OS release ("alpine 3.17").
	osBucket func(release string) bucket.Bucket
	// langBucket names the root bucket of a language ecosystem
	// ("pip::GitHub Security Advisory pip").
	langBucket func(types.DataSource) (bucket.DataSourceBucket, error)
	// trivyEcosystem normalises package names the way Trivy does on lookup.
	trivyEcosystem ecosystem.Type
}

func githubSource(displayName string) types.DataSource {
	return types.DataSource{
		ID:   vulnerability.GHSA,
		Name: "GitHub Security Advisory " + displayName,
		URL:  "https://github.com/advisories?query=type%3Areviewed+ecosystem%3A" + strings.ToLower(displayName),
	}
}

var ecosystems = map[string]ecosystemSpec{
	"alpine": {
		os:             true,
		exampleRelease: "3.17",
		dataSource:     types.DataSource{ID: vulnerability.Alpine, Name: "Alpine Secdb", URL: "https://secdb.alpinelinux.org/"},
		osBucket:       bucket.NewAlpine,
	},
	"debian": {
		os:             true,
		exampleRelease: "12",
		dataSource: types.DataSource{ID: vulnerability.Debian, Name: "Debian Security Tracker",
			URL: "https://salsa.debian.org/security-tracker-team/security-tracker"},
		osBucket: bucket.NewDebian,
	},
	"ubuntu": {
		os:             true,
		exampleRelease: "22.04",
		dataSource: types.DataSource{ID: vulnerability.Ubuntu, Name: "Ubuntu CVE Tracker",
			URL: "https://git.launchpad.net/ubuntu-cve-tracker"},
		osBucket: bucket.NewUbuntu,
	},
	"npm":      {dataSource: githubSource("npm"), langBucket: bucket.NewNpm, trivyEcosystem: ecosystem.Npm},
	"pip":      {dataSource: githubSource("pip"), langBucket: bucket.NewPyPI, trivyEcosystem: ecosystem.Pip},
	"go":       {dataSource: githubSource("Go"), langBucket: bucket.NewGo, trivyEcosystem: ecosystem.Go},
	"maven":    {dataSource: githubSource("Maven"), langBucket: bucket.NewMaven, trivyEcosystem: ecosystem.Maven},
	"rubygems": {dataSource: githubSource("RubyGems"), langBucket: bucket.NewRubyGems, trivyEcosystem: ecosystem.RubyGems},
	"cargo":    {dataSource: githubSource("Rust"), langBucket: bucket.NewCargo, trivyEcosystem: ecosystem.Cargo},
	"nuget":    {dataSource: githubSource("NuGet"), langBucket: bucket.NewNuGet, trivyEcosystem: ecosystem.NuGet},
	"composer": {dataSource: githubSource("Composer"), langBucket: bucket.NewComposer, trivyEcosystem: ecosystem.Composer},
}

func ecosystemNames() []string {
	names := make([]string, 0, len(ecosystems))
	for name := range ecosystems {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// bucketName returns the root bucket that Trivy reads for this entry.
func (a Affected) bucketName() (string, types.DataSource, error) {
	eco := ecosystems[a.Ecosystem]
	if eco.os {
		return eco.osBucket(a.Release).Name(), eco.dataSource, nil
	}
	langBucket, err := eco.langBucket(eco.dataSource)
	if err != nil {
		return "", types.DataSource{}, fmt.Errorf("naming the %s bucket failed: %w", a.Ecosystem, err)
	}
	return langBucket.Name(), eco.dataSource, nil
}

// packageKey returns the package name under which Trivy looks the package
// up: OS packages by source package name as written, language packages
// normalised (pip names lower-cased with "_" as "-", for example).
func (a Affected) packageKey() string {
	eco := ecosystems[a.Ecosystem]
	if eco.os {
		return a.Package
	}
	return vulnerability.NormalizePkgName(eco.trivyEcosystem, a.Package)
}
