package main

import (
	"fmt"
	"strings"
	"text/tabwriter"
)

// Status of one line of the report.
type Status string

// Statuses: a check that met its target, one that missed it, and a
// measurement with no target.
const (
	Pass Status = "PASS"
	Fail Status = "FAIL"
	Info Status = "info"
)

// Row is one line of the GPU check's table.
type Row struct {
	Section string // correctness, ipc, merge
	Name    string
	Result  string
	Target  string
	Status  Status
}

// Report collects the rows and notes of one run.
type Report struct {
	Device string
	Rows   []Row
	Notes  []string
	// Sections are markdown blocks (a step's own table) rendered after
	// the notes under their titles.
	Sections []Section
}

// Section is a titled markdown block of the report.
type Section struct{ Title, Body string }

// AddSection appends a titled markdown block.
func (r *Report) AddSection(title, body string) {
	r.Sections = append(r.Sections, Section{Title: title, Body: body})
}

// Add appends a row.
func (r *Report) Add(section, name, result, target string, st Status) {
	r.Rows = append(r.Rows, Row{Section: section, Name: name, Result: result, Target: target, Status: st})
}

// Check appends a row whose status is Pass when ok, else Fail.
func (r *Report) Check(section, name, result, target string, ok bool) {
	st := Pass
	if !ok {
		st = Fail
	}
	r.Add(section, name, result, target, st)
}

// Note appends a free-text note.
func (r *Report) Note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// Failed counts the rows that missed their target.
func (r *Report) Failed() int {
	n := 0
	for _, row := range r.Rows {
		if row.Status == Fail {
			n++
		}
	}
	return n
}

// Table renders the short terminal table.
func (r *Report) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "GPU check on %s\n", r.Device)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "section\tcheck\tresult\ttarget\tstatus")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", row.Section, row.Name, row.Result, orDash(row.Target), row.Status)
	}
	tw.Flush()
	fmt.Fprintf(&b, "%d checks, %d failed\n", len(r.Rows), r.Failed())
	for _, sec := range r.Sections {
		fmt.Fprintf(&b, "\n%s\n%s", sec.Title, sec.Body)
	}
	return b.String()
}

// Markdown renders bench/gpu-results.md.
func (r *Report) Markdown(when, command string) string {
	var b strings.Builder
	b.WriteString("# GPU check results\n\n")
	fmt.Fprintf(&b, "Written by `%s` on %s, %s.\n\n", command, r.Device, when)
	b.WriteString("| section | check | result | target | status |\n|---|---|---|---|---|\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", row.Section, mdCell(row.Name), mdCell(row.Result), mdCell(orDash(row.Target)), row.Status)
	}
	fmt.Fprintf(&b, "\n%d checks, %d failed.\n", len(r.Rows), r.Failed())
	if len(r.Notes) > 0 {
		b.WriteString("\n## Notes\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	for _, sec := range r.Sections {
		fmt.Fprintf(&b, "\n## %s\n\n%s", sec.Title, sec.Body)
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func mdCell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

// Identical formats a comparison: "12345/12345 (100.0000%)".
func Identical(same, total int64) string {
	if total == 0 {
		return "0/0"
	}
	return fmt.Sprintf("%d/%d (%.4f%%)", same, total, 100*float64(same)/float64(total))
}

// MinIdentical is the share of codes that must match the CPU codec.
const MinIdentical = 0.9999

// IdenticalOK reports whether same/total meets MinIdentical.
func IdenticalOK(same, total int64) bool {
	return total > 0 && float64(same) >= MinIdentical*float64(total)
}

// GBps formats bytes moved in seconds as GB/s (10^9).
func GBps(bytes float64, seconds float64) string {
	if seconds <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.0f GB/s", bytes/seconds/1e9)
}

// MiB formats bytes as MiB.
func MiB(bytes int64) string { return fmt.Sprintf("%.1f MiB", float64(bytes)/(1<<20)) }

// lastLine is the last non-empty line of a child's output.
func lastLine(s string) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(ls[len(ls)-1])
}
