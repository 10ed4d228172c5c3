// pprof_inspect reads pprof profiles with Go's own parser (github.com/google/pprof/profile,
// the package Parca's and Grafana Alloy's scrapers call) and prints, as one JSON object per
// file, what those backends read from them: sample types, period type, default sample type,
// labels, mappings and totals. A file Go cannot parse or that fails CheckValid is an error.
//
// Build without modules over Debian's golang-github-google-pprof-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o pprof_inspect .
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/google/pprof/profile"
)

type valueType struct {
	Type string `json:"type"`
	Unit string `json:"unit"`
}

type mapping struct {
	File         string `json:"file"`
	BuildID      string `json:"build_id"`
	Start        uint64 `json:"start"`
	Limit        uint64 `json:"limit"`
	HasFunctions bool   `json:"has_functions"`
}

type summary struct {
	SampleTypes       []valueType         `json:"sample_types"`
	PeriodType        *valueType          `json:"period_type"`
	Period            int64               `json:"period"`
	DefaultSampleType string              `json:"default_sample_type"`
	Samples           int                 `json:"samples"`
	Totals            map[string]int64    `json:"totals"`
	Labels            map[string][]string `json:"labels"`
	Mappings          []mapping           `json:"mappings"`
	Functions         []string            `json:"functions"`
	Comments          []string            `json:"comments"`
}

func inspect(path string) (*summary, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p, err := profile.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if err := p.CheckValid(); err != nil {
		return nil, fmt.Errorf("%s: invalid profile: %v", path, err)
	}
	s := &summary{
		Period:            p.Period,
		DefaultSampleType: p.DefaultSampleType,
		Samples:           len(p.Sample),
		Totals:            map[string]int64{},
		Labels:            map[string][]string{},
		Comments:          p.Comments,
	}
	for _, st := range p.SampleType {
		s.SampleTypes = append(s.SampleTypes, valueType{st.Type, st.Unit})
	}
	if p.PeriodType != nil {
		s.PeriodType = &valueType{p.PeriodType.Type, p.PeriodType.Unit}
	}
	seen := map[string]map[string]bool{}
	for _, sample := range p.Sample {
		for i, v := range sample.Value {
			s.Totals[p.SampleType[i].Type] += v
		}
		for key, values := range sample.Label {
			if seen[key] == nil {
				seen[key] = map[string]bool{}
			}
			for _, v := range values {
				seen[key][v] = true
			}
		}
	}
	for key, values := range seen {
		for v := range values {
			s.Labels[key] = append(s.Labels[key], v)
		}
		sort.Strings(s.Labels[key])
	}
	for _, m := range p.Mapping {
		s.Mappings = append(s.Mappings, mapping{m.File, m.BuildID, m.Start, m.Limit, m.HasFunctions})
	}
	for _, fn := range p.Function {
		s.Functions = append(s.Functions, fn.Name)
	}
	sort.Strings(s.Functions)
	return s, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: pprof_inspect PROFILE...")
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, path := range os.Args[1:] {
		s, err := inspect(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if err := out.Encode(s); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
